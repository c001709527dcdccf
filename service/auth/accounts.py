"""Account operations: registration and password changes."""

from __future__ import annotations

import uuid

from service.auth import attempts
from service.auth.passwords import Passwords
from service.auth.sessions import revoke_all_sessions
from service.errors import ApiError, unauthorized
from service.events import audit
from service.store import Store
from service.store import users as user_store
from service.store.throttle import Throttle
from service.store.users import Account, UsernameTaken


async def register(*, store: Store, passwords: Passwords, username: str, password: str) -> Account:
    """Create an account; 409 if the username is taken."""
    password_hash = await passwords.hash(password)
    try:
        async with store.db.session() as session:
            account = await user_store.create_user(
                session, username=username, password_hash=password_hash
            )
    except UsernameTaken:
        raise ApiError(409, "That username is already taken.") from None
    audit("registered", user_id=account.id)
    return account


async def get_account(*, store: Store, user_id: str) -> Account:
    """The account a token speaks for; 401 if it no longer exists."""
    async with store.db.session() as session:
        account = await user_store.get_account(session, user_id=uuid.UUID(user_id))
    if account is None:
        raise unauthorized("The account no longer exists.")
    return account


async def change_password(
    *,
    store: Store,
    passwords: Passwords,
    throttle: Throttle,
    user_id: str,
    username: str,
    current: str,
    new: str,
    address: str,
) -> None:
    """Check the current password, store the new hash, and revoke every session of the user.

    A wrong current password counts as a failed sign-in: a stolen access token must not
    buy unlimited guesses.
    """
    uid = uuid.UUID(user_id)
    attempt = attempts.sign_in(settings=store.settings, username=username, address=address)
    await attempts.check(throttle=throttle, attempt=attempt)
    async with store.db.session() as session:
        current_hash = await user_store.get_password_hash(session, user_id=uid)
    if not (await passwords.verify(current_hash, current)).ok:
        await attempts.failed(throttle=throttle, attempt=attempt)
        audit("login_failed", user_id=user_id, via="password_change")
        raise ApiError(403, "The current password is wrong.")
    await attempts.succeeded(throttle=throttle, attempt=attempt)
    new_hash = await passwords.hash(new)
    async with store.db.session() as session:
        await user_store.set_password_hash(session, user_id=uid, password_hash=new_hash)
    audit("password_changed", user_id=user_id)
    await revoke_all_sessions(store=store, user_id=user_id, reason="password-change")

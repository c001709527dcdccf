"""Account operations: registration, password and email changes."""

from __future__ import annotations

import uuid

from service.auth import attempts
from service.auth.passwords import Passwords
from service.auth.sessions import revoke_all_sessions
from service.config import Settings
from service.errors import ApiError, unauthorized
from service.events import audit
from service.store import Store
from service.store import users as user_store
from service.store.throttle import Throttle
from service.store.users import Account, EmailTaken, UsernameTaken

USERNAME_TAKEN = "That username is already taken."
# Says no more than that: not whose it is, nor the address itself.
EMAIL_TAKEN = "That email address is already in use by another account."
REGISTRATION_CLOSED = "Registration is closed: an administrator creates accounts."


def require_open_registration(settings: Settings) -> None:
    """403 while self-registration is switched off (REGISTRATION_OPEN=false)."""
    if not settings.registration_open:
        raise ApiError(403, REGISTRATION_CLOSED)


async def register(
    *, store: Store, passwords: Passwords, username: str, password: str, email: str | None = None
) -> Account:
    """Create an account; 409 if the username or the email address is taken."""
    password_hash = await passwords.hash(password)
    try:
        async with store.db.session() as session:
            account = await user_store.create_user(
                session, username=username, password_hash=password_hash, email=email
            )
    except UsernameTaken:
        raise ApiError(409, USERNAME_TAKEN) from None
    except EmailTaken:
        raise ApiError(409, EMAIL_TAKEN) from None
    audit("registered", user_id=account.id)
    return account


async def get_account(*, store: Store, user_id: str) -> Account:
    """The account a token speaks for; 401 if it no longer exists."""
    try:
        uid = uuid.UUID(user_id)
    except ValueError:
        raise unauthorized("The token does not speak for an account.") from None
    async with store.db.session() as session:
        account = await user_store.get_account(session, user_id=uid)
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
    """Check the current password, store the new hash, and revoke every session of the user."""
    uid = uuid.UUID(user_id)
    await _confirm_password(
        store=store,
        passwords=passwords,
        throttle=throttle,
        user_id=uid,
        username=username,
        password=current,
        address=address,
        via="password_change",
    )
    new_hash = await passwords.hash(new)
    async with store.db.session() as session:
        await user_store.set_password_hash(session, user_id=uid, password_hash=new_hash)
    audit("password_changed", user_id=user_id)
    await revoke_all_sessions(store=store, user_id=user_id, reason="password-change")


async def change_email(
    *,
    store: Store,
    passwords: Passwords,
    throttle: Throttle,
    user_id: str,
    username: str,
    current: str,
    email: str | None,
    address: str,
) -> None:
    """Check the current password, then set (or, with None, remove) the email; 409 if taken."""
    uid = uuid.UUID(user_id)
    await _confirm_password(
        store=store,
        passwords=passwords,
        throttle=throttle,
        user_id=uid,
        username=username,
        password=current,
        address=address,
        via="email_change",
    )
    try:
        async with store.db.session() as session:
            found = await user_store.set_email(session, user_id=uid, email=email)
    except EmailTaken:
        raise ApiError(409, EMAIL_TAKEN) from None
    if not found:
        raise unauthorized("The account no longer exists.")


async def _confirm_password(
    *,
    store: Store,
    passwords: Passwords,
    throttle: Throttle,
    user_id: uuid.UUID,
    username: str,
    password: str,
    address: str,
    via: str,
) -> None:
    """403 unless password is the account's; a wrong one counts as a failed sign-in.

    A stolen access token must not buy unlimited guesses.
    """
    attempt = attempts.sign_in(settings=store.settings, username=username, address=address)
    await attempts.check(throttle=throttle, attempt=attempt)
    async with store.db.session() as session:
        current_hash = await user_store.get_password_hash(session, user_id=user_id)
    if not (await passwords.verify(current_hash, password)).ok:
        await attempts.failed(throttle=throttle, attempt=attempt)
        audit("login_failed", user_id=str(user_id), via=via)
        raise ApiError(403, "The current password is wrong.")
    await attempts.succeeded(throttle=throttle, attempt=attempt)

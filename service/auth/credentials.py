"""A username and password checked as one counted sign-in attempt."""

from __future__ import annotations

from service.auth import attempts
from service.auth.passwords import Passwords, Verification
from service.events import audit
from service.store import Store
from service.store import users as user_store
from service.store.throttle import Throttle
from service.store.users import Account

MAX_USERNAME = 256  # longer than any account's: not looked up


async def verify_credentials(
    *,
    store: Store,
    passwords: Passwords,
    throttle: Throttle,
    username: str,
    password: str,
    address: str,
) -> tuple[Account, Verification] | None:
    """The account and its password check, or None; unknown users cost what wrong ones do.

    None as well for a disabled account, whatever the password.

    Failures count as failed sign-ins (attempts.py): past a limit, TooManyAttempts (429).
    """
    attempt = attempts.sign_in(settings=store.settings, username=username, address=address)
    await attempts.check(throttle=throttle, attempt=attempt)
    found = None
    if username.isprintable() and len(username) <= MAX_USERNAME:
        async with store.db.session() as session:
            found = await user_store.find_credentials(session, username=username)
    account, password_hash = found if found else (None, None)
    verification = await passwords.verify(password_hash, password)
    # A disabled account is answered as a wrong password, after the same work: the
    # answer tells a guesser nothing, not even that the password was right.
    if account is None or account.disabled or not verification.ok:
        await attempts.failed(throttle=throttle, attempt=attempt)
        audit("login_failed", user_id=account.id if account else None)
        return None
    await attempts.succeeded(throttle=throttle, attempt=attempt)
    return account, verification

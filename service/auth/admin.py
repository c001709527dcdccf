"""Account administration: what `python -m service users ...` does, as plain functions.

Every change that ends sign-ins goes through Store.revoking(), the path logout-all takes:
the durable revocation commits with the change itself, then Redis and the revocation feed
put it in force on every worker before the call returns.
"""

from __future__ import annotations

import uuid

from service.auth.passwords import Passwords
from service.auth.sessions import end_user_sessions, revoke_all_sessions
from service.store import Store
from service.store import users as user_store
from service.store.users import Account, AccountDetails

# Session ids carry the clock of the host that made them; this one may lag it. For an
# account that may not sign in any more, the cutoff is set this far ahead, so a session
# begun just before on a host whose clock runs ahead is still covered.
AHEAD_MS = 5000


class NoSuchUser(Exception):
    """No account has this username or id."""


class AmbiguousUser(Exception):
    """The name is one account's username and another's id."""


async def find(*, store: Store, name_or_id: str) -> Account:
    """The one account a username (any case) or id names."""
    async with store.db.session() as session:
        found = await user_store.find_accounts(session, name_or_id=name_or_id)
    if not found:
        raise NoSuchUser(name_or_id)
    if len(found) > 1:
        raise AmbiguousUser(name_or_id)
    return found[0]


async def list_accounts(*, store: Store, after: str | None, limit: int) -> list[Account]:
    """Accounts in username order, after the username `after`."""
    async with store.db.session() as session:
        return await user_store.list_accounts(session, after=after, limit=limit)


async def details(*, store: Store, user_id: uuid.UUID) -> AccountDetails:
    """An account's dates and what it has open."""
    async with store.db.session() as session:
        found = await user_store.get_details(session, user_id=user_id)
    if found is None:
        raise NoSuchUser(str(user_id))
    return found


async def create(
    *, store: Store, passwords: Passwords, username: str, password: str, email: str | None
) -> Account:
    """Create an account, registration open or not; UsernameTaken or EmailTaken if taken."""
    password_hash = await passwords.hash(password)
    async with store.db.session() as session:
        return await user_store.create_user(
            session, username=username, password_hash=password_hash, email=email
        )


async def disable(*, store: Store, user_id: uuid.UUID) -> bool:
    """Disable an account and revoke every token it holds; False if it was disabled already.

    The UPDATE waits for any login holding the account (sessions.login checks it under a
    lock), so every session begun before is under the cutoff taken after it, and every
    login after it finds the account disabled.
    """
    async with store.revoking() as (session, revocations):
        changed = await user_store.set_disabled(session, user_id=user_id, disabled=True)
        if changed:
            await end_user_sessions(
                session,
                revocations,
                store=store,
                user_id=user_id,
                reason="disabled",
                ahead_ms=AHEAD_MS,
            )
    return changed


async def enable(*, store: Store, user_id: uuid.UUID) -> bool:
    """Let a disabled account sign in again; its earlier tokens stay revoked."""
    async with store.db.session() as session:
        return await user_store.set_disabled(session, user_id=user_id, disabled=False)


async def delete(*, store: Store, user_id: uuid.UUID) -> bool:
    """Delete an account and revoke every token it holds, OAuth tokens included.

    Its login sessions and its OAuth consents, grants, codes and refresh tokens are
    deleted with it; its access tokens, first-party and OAuth, are refused by the same
    user-wide revocation as logout-all's, which outlives the account.
    """
    async with store.revoking() as (session, revocations):
        if not await user_store.lock_account(session, user_id=user_id):
            return False
        await end_user_sessions(
            session, revocations, store=store, user_id=user_id, reason="deleted", ahead_ms=AHEAD_MS
        )
        await user_store.delete_user(session, user_id=user_id)
    return True


async def revoke_sessions(*, store: Store, user_id: uuid.UUID) -> None:
    """Revoke every token of the account issued up to now, as its own logout-all would."""
    await revoke_all_sessions(store=store, user_id=str(user_id), reason="admin")


async def set_password(
    *, store: Store, passwords: Passwords, user_id: uuid.UUID, password: str
) -> bool:
    """Replace the password and revoke every session, in one commit; False if the user is gone."""
    password_hash = await passwords.hash(password)
    async with store.revoking() as (session, revocations):
        if not await user_store.lock_account(session, user_id=user_id):
            return False
        await user_store.set_password_hash(session, user_id=user_id, password_hash=password_hash)
        await end_user_sessions(
            session, revocations, store=store, user_id=user_id, reason="password-reset"
        )
    return True


async def set_email(*, store: Store, user_id: uuid.UUID, email: str | None) -> bool:
    """Set or (with None) remove the email address; EmailTaken if another account has it."""
    async with store.db.session() as session:
        return await user_store.set_email(session, user_id=user_id, email=email)

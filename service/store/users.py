"""User accounts: creation, lookup and password hashes (which stay in this layer)."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.store.models import LoginSession, User, utcnow
from service.store.oauth_models import OAuthGrant


class UsernameTaken(Exception):
    """Another account already has this username (compared case-insensitively)."""


class EmailTaken(Exception):
    """Another account already has this email address (compared case-insensitively)."""


@dataclass(frozen=True, slots=True)
class Account:
    """A user as the rest of the service sees it: no password hash."""

    id: uuid.UUID
    username: str
    email: str | None = None
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class AccountDetails:
    """An account as an administrator sees it: still no password hash."""

    account: Account
    created_at: datetime
    password_changed_at: datetime
    disabled_at: datetime | None
    open_sessions: int
    live_oauth_grants: int


ACCOUNT_COLUMNS = (User.id, User.username, User.email, User.disabled_at)


def _account(row: Any) -> Account:
    return Account(
        id=row.id, username=row.username, email=row.email, disabled=row.disabled_at is not None
    )


def username_key(username: str) -> str:
    """The case-folded form usernames are unique under."""
    return username.casefold()


def email_key(email: str) -> str:
    """The form email addresses are unique under (they are ASCII: lower case)."""
    return email.lower()


def _taken(exc: IntegrityError, username: str) -> Exception:
    """Which unique key a failed write collided with."""
    if "email_key" in str(exc.orig):
        return EmailTaken()
    return UsernameTaken(username)


async def create_user(
    session: AsyncSession, *, username: str, password_hash: str, email: str | None = None
) -> Account:
    """Insert a user; raises UsernameTaken or EmailTaken on a duplicate."""
    user = User(
        username=username,
        username_key=username_key(username),
        password_hash=password_hash,
        email=email,
        email_key=email_key(email) if email is not None else None,
    )
    session.add(user)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise _taken(exc, username) from exc
    return Account(id=user.id, username=user.username, email=user.email)


async def find_credentials(session: AsyncSession, *, username: str) -> tuple[Account, str] | None:
    """Return the account and its password hash, or None for an unknown username."""
    row = (
        await session.execute(
            select(*ACCOUNT_COLUMNS, User.password_hash).where(
                User.username_key == username_key(username)
            )
        )
    ).one_or_none()
    if row is None:
        return None
    return _account(row), row.password_hash


async def get_password_hash(session: AsyncSession, *, user_id: uuid.UUID) -> str | None:
    """Return the stored hash of one user, or None if the user is gone."""
    return await session.scalar(select(User.password_hash).where(User.id == user_id))


async def get_account(session: AsyncSession, *, user_id: uuid.UUID) -> Account | None:
    """Return one account by id."""
    row = (await session.execute(select(*ACCOUNT_COLUMNS).where(User.id == user_id))).one_or_none()
    return None if row is None else _account(row)


async def find_accounts(session: AsyncSession, *, name_or_id: str) -> list[Account]:
    """The accounts a username (any case) or an id names: none, one, or (rarely) two."""
    matches = [User.username_key == username_key(name_or_id)]
    with contextlib.suppress(ValueError):
        matches.append(User.id == uuid.UUID(name_or_id))
    rows = await session.execute(select(*ACCOUNT_COLUMNS).where(or_(*matches)))
    return [_account(row) for row in rows]


async def list_accounts(
    session: AsyncSession, *, after: str | None = None, limit: int = 100
) -> list[Account]:
    """Accounts in username order, from just after the username `after`."""
    query = select(*ACCOUNT_COLUMNS).order_by(User.username_key).limit(limit)
    if after is not None:
        query = query.where(User.username_key > username_key(after))
    return [_account(row) for row in await session.execute(query)]


async def get_details(session: AsyncSession, *, user_id: uuid.UUID) -> AccountDetails | None:
    """One account with its dates and what it has open now."""
    now = utcnow()
    open_sessions = (
        select(func.count())
        .where(
            LoginSession.user_id == User.id,
            LoginSession.revoked_at.is_(None),
            LoginSession.expires_at > now,
        )
        .scalar_subquery()
    )
    live_grants = (
        select(func.count())
        .where(
            OAuthGrant.user_id == User.id,
            OAuthGrant.revoked_at.is_(None),
            OAuthGrant.expires_at > now,
        )
        .scalar_subquery()
    )
    row = (
        await session.execute(
            select(
                *ACCOUNT_COLUMNS,
                User.created_at,
                User.password_changed_at,
                open_sessions.label("open_sessions"),
                live_grants.label("live_grants"),
            ).where(User.id == user_id)
        )
    ).one_or_none()
    if row is None:
        return None
    return AccountDetails(
        account=_account(row),
        created_at=row.created_at,
        password_changed_at=row.password_changed_at,
        disabled_at=row.disabled_at,
        open_sessions=int(row.open_sessions),
        live_oauth_grants=int(row.live_grants),
    )


async def lock_enabled(session: AsyncSession, *, user_id: uuid.UUID) -> bool:
    """Whether the account exists and is enabled, holding it so until the transaction ends.

    FOR SHARE: disabling (or deleting) the account waits for this transaction, and a
    transaction that disables it first makes this wait and then answer False.
    """
    found = await session.scalar(
        select(User.id)
        .where(User.id == user_id, User.disabled_at.is_(None))
        .with_for_update(read=True)
    )
    return found is not None


async def set_disabled(session: AsyncSession, *, user_id: uuid.UUID, disabled: bool) -> bool:
    """Disable or enable an account; False if it was so already (or is gone)."""
    state = User.disabled_at.is_(None) if disabled else User.disabled_at.is_not(None)
    result = await session.execute(
        update(User)
        .where(User.id == user_id, state)
        .values(disabled_at=utcnow() if disabled else None)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def lock_account(session: AsyncSession, *, user_id: uuid.UUID) -> bool:
    """Lock an account's row until the transaction ends; False if it is gone."""
    found = await session.scalar(select(User.id).where(User.id == user_id).with_for_update())
    return found is not None


async def delete_user(session: AsyncSession, *, user_id: uuid.UUID) -> bool:
    """Delete an account; its sessions and OAuth consents, grants, codes and tokens cascade."""
    result = await session.execute(delete(User).where(User.id == user_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def set_email(session: AsyncSession, *, user_id: uuid.UUID, email: str | None) -> bool:
    """Replace (or remove) an account's email address; EmailTaken if another has it."""
    try:
        result = await session.execute(
            update(User)
            .where(User.id == user_id)
            .values(email=email, email_key=email_key(email) if email is not None else None)
        )
    except IntegrityError as exc:
        raise EmailTaken() from exc
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def end_sessions_before(
    session: AsyncSession, *, user_id: uuid.UUID, cutoff: datetime
) -> None:
    """Make every sign-in of the user before cutoff invalid (browser sign-ins included)."""
    await session.execute(
        update(User).where(User.id == user_id).values(sessions_valid_after=cutoff)
    )


async def set_password_hash(
    session: AsyncSession, *, user_id: uuid.UUID, password_hash: str
) -> None:
    """Replace a user's password hash."""
    await session.execute(
        update(User)
        .where(User.id == user_id)
        .values(password_hash=password_hash, password_changed_at=utcnow())
    )

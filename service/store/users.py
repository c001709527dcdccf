"""User accounts: creation, lookup and password hashes (which stay in this layer)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.store.models import User, utcnow


class UsernameTaken(Exception):
    """Another account already has this username (compared case-insensitively)."""


@dataclass(frozen=True, slots=True)
class Account:
    """A user as the rest of the service sees it: no password hash."""

    id: uuid.UUID
    username: str


def username_key(username: str) -> str:
    """The case-folded form usernames are unique under."""
    return username.casefold()


async def create_user(session: AsyncSession, *, username: str, password_hash: str) -> Account:
    """Insert a user; raises UsernameTaken on a duplicate."""
    user = User(username=username, username_key=username_key(username), password_hash=password_hash)
    session.add(user)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise UsernameTaken(username) from exc
    return Account(id=user.id, username=user.username)


async def find_credentials(session: AsyncSession, *, username: str) -> tuple[Account, str] | None:
    """Return the account and its password hash, or None for an unknown username."""
    row = (
        await session.execute(
            select(User.id, User.username, User.password_hash).where(
                User.username_key == username_key(username)
            )
        )
    ).one_or_none()
    if row is None:
        return None
    return Account(id=row.id, username=row.username), row.password_hash


async def get_password_hash(session: AsyncSession, *, user_id: uuid.UUID) -> str | None:
    """Return the stored hash of one user, or None if the user is gone."""
    return await session.scalar(select(User.password_hash).where(User.id == user_id))


async def get_account(session: AsyncSession, *, user_id: uuid.UUID) -> Account | None:
    """Return one account by id."""
    row = (
        await session.execute(select(User.id, User.username).where(User.id == user_id))
    ).one_or_none()
    return None if row is None else Account(id=row.id, username=row.username)


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

"""Login sessions: the refresh-token chain of one login, rotated by compare-and-swap."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.store.db import Database
from service.store.models import LoginSession, User, utcnow


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What a rotation needs to issue the next tokens."""

    sid: str
    user_id: uuid.UUID
    username: str
    expires_at: datetime


async def open_session(
    session: AsyncSession, *, sid: str, user_id: uuid.UUID, refresh_jti: str, expires_at: datetime
) -> None:
    """Record a new login session and its first refresh token."""
    session.add(
        LoginSession(id=sid, user_id=user_id, refresh_jti=refresh_jti, expires_at=expires_at)
    )
    await session.flush()


_SESSIONS = cast(Table, LoginSession.__table__)
_ROTATE = (
    update(_SESSIONS)
    .where(
        _SESSIONS.c.id == bindparam("sid"),
        _SESSIONS.c.refresh_jti == bindparam("presented"),
        _SESSIONS.c.revoked_at.is_(None),
        _SESSIONS.c.expires_at > bindparam("now"),
    )
    .values(refresh_jti=bindparam("next"), rotated_at=bindparam("now"))
    .returning(
        _SESSIONS.c.user_id,
        _SESSIONS.c.expires_at,
        select(User.username)
        .where(User.id == _SESSIONS.c.user_id)
        .scalar_subquery()
        .label("username"),
    )
)


async def rotate(
    database: Database, *, sid: str, presented_jti: str, next_jti: str
) -> SessionInfo | None:
    """Swap the current refresh jti if it is the presented one; None means it was not.

    The UPDATE's WHERE clause is the compare-and-swap: of two concurrent rotations with the
    same token, the second re-reads the row after the first commits and matches nothing.
    One statement, built once, committed by itself: this runs on every refresh.
    """
    values = {"sid": sid, "presented": presented_jti, "next": next_jti, "now": utcnow()}
    async with database.statement() as connection:
        row = (await connection.execute(_ROTATE, values)).one_or_none()
    if row is None or row.username is None:
        return None
    return SessionInfo(
        sid=sid, user_id=row.user_id, username=row.username, expires_at=row.expires_at
    )


_CLOSE_MANY = (
    update(_SESSIONS)
    .where(_SESSIONS.c.id.in_(bindparam("sids", expanding=True)), _SESSIONS.c.revoked_at.is_(None))
    .values(revoked_at=bindparam("now"), revoked_reason=bindparam("reason"))
    .returning(_SESSIONS.c.id, _SESSIONS.c.expires_at, _SESSIONS.c.user_id)
)
_FIND_MANY = select(_SESSIONS.c.id, _SESSIONS.c.expires_at, _SESSIONS.c.user_id).where(
    _SESSIONS.c.id.in_(bindparam("sids", expanding=True))
)


async def close_sessions(
    session: AsyncSession, *, sids: list[str], reason: str
) -> dict[str, tuple[datetime, uuid.UUID]]:
    """Mark sessions revoked; returns the expiry and user of each that exists."""
    values = {"sids": sids, "now": utcnow(), "reason": reason}
    found = {
        row.id: (row.expires_at, row.user_id) for row in await session.execute(_CLOSE_MANY, values)
    }
    missing = [sid for sid in sids if sid not in found]
    if missing:
        rows = await session.execute(_FIND_MANY, {"sids": missing})
        found.update({row.id: (row.expires_at, row.user_id) for row in rows})
    return found


async def close_user_sessions(
    session: AsyncSession, *, user_id: uuid.UUID, cutoff_ms: int, reason: str
) -> int:
    """Mark a user's open sessions begun up to cutoff_ms revoked; returns how many.

    Session ids are UUIDv7 in hex, so their order is their start time: every id below the
    first one possible after cutoff_ms began at or before it (what the blocklist revokes).
    """
    first_after = f"{cutoff_ms + 1:012x}" + "0" * 20
    result = await session.execute(
        update(LoginSession)
        .where(
            LoginSession.user_id == user_id,
            LoginSession.revoked_at.is_(None),
            LoginSession.id < first_after,
        )
        .values(revoked_at=utcnow(), revoked_reason=reason)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]

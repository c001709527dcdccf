"""Durable revocations in the database: the record the blocklist is rebuilt from."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, delete, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.store.blocklist import Entry, Kind
from service.store.models import Revocation, utcnow


async def record(session: AsyncSession, *, entries: Iterable[Entry]) -> None:
    """Upsert revocations, keeping the later expiry and the later user cutoff."""
    merged: dict[tuple[Kind, str], Entry] = {}
    for entry in entries:
        key = (entry.kind, entry.subject)
        if (seen := merged.get(key)) is not None:
            entry = Entry(
                kind=entry.kind,
                subject=entry.subject,
                expires_at=max(entry.expires_at, seen.expires_at),
                cutoff_ms=max(entry.cutoff_ms or 0, seen.cutoff_ms or 0) or None,
            )
        merged[key] = entry
    rows = [
        {
            "kind": entry.kind.value,
            "subject": entry.subject,
            "expires_at": datetime.fromtimestamp(entry.expires_at, UTC),
            "cutoff_ms": entry.cutoff_ms,
            "created_at": utcnow(),
        }
        for entry in merged.values()
    ]
    if not rows:
        return
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = insert(Revocation).values(rows)
    excluded = statement.excluded
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[Revocation.kind, Revocation.subject],
            set_={
                "expires_at": _greatest(Revocation.expires_at, excluded.expires_at),
                "cutoff_ms": _greatest(Revocation.cutoff_ms, excluded.cutoff_ms),
            },
        )
    )


def _greatest(current: Any, proposed: Any) -> Any:
    """SQL for the larger of two values, where the current one may be NULL."""
    return case((or_(current.is_(None), proposed > current), proposed), else_=current)


async def stream_active(session: AsyncSession) -> AsyncIterator[Entry]:
    """Yield every revocation that still covers a usable token."""
    result = await session.stream(
        select(Revocation.kind, Revocation.subject, Revocation.expires_at, Revocation.cutoff_ms)
        .where(Revocation.expires_at > utcnow())
        .execution_options(yield_per=1000)
    )
    async for row in result:
        yield Entry(
            kind=Kind(row.kind),
            subject=row.subject,
            expires_at=int(row.expires_at.timestamp()),
            cutoff_ms=row.cutoff_ms,
        )


async def purge_expired(session: AsyncSession) -> int:
    """Delete revocations whose tokens have all expired; returns how many."""
    result = await session.execute(delete(Revocation).where(Revocation.expires_at <= utcnow()))
    return int(result.rowcount)  # type: ignore[attr-defined]

"""Durable revocations in the database: the record the blocklist is rebuilt from."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, func, or_, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.store.blocklist import Entry, Kind
from service.store.groups import GROUPS, group_of
from service.store.models import Revocation, UnwrittenRevocations, utcnow

SEQUENCE = "revocation_seq"
STREAM_BATCH = 5000
# Longer than any revocation's transaction may stay open (database timeouts bound it),
# and than the clocks of the service's hosts may differ.
COMMIT_SKEW = timedelta(minutes=1)


async def record(session: AsyncSession, *, entries: Iterable[Entry]) -> int | None:
    """Upsert revocations, keeping the later expiry and user cutoff; returns their highest seq.

    Every write takes a new number from the sequence, also when it only confirms a row:
    the blocklist in Redis must hold it again (None on SQLite, which numbers nothing).
    """
    merged: dict[tuple[Kind, str], Entry] = {}
    for entry in entries:
        key = (entry.kind, entry.subject)
        if (seen := merged.get(key)) is not None:
            entry = Entry(
                kind=entry.kind,
                subject=entry.subject,
                expires_at=max(entry.expires_at, seen.expires_at),
                cutoff_ms=max(entry.cutoff_ms or 0, seen.cutoff_ms or 0) or None,
                user=entry.user or seen.user,
            )
        merged[key] = entry
    now = utcnow()
    rows = [
        {
            "kind": entry.kind.value,
            "subject": entry.subject,
            "expires_at": datetime.fromtimestamp(entry.expires_at, UTC),
            "cutoff_ms": entry.cutoff_ms,
            "created_at": now,
            "user_id": entry.owner,
            "user_group": None if entry.owner is None else group_of(entry.owner),
        }
        for entry in merged.values()
    ]
    if not rows:
        return None
    statement = _UPSERTS[session.get_bind().dialect.name]
    result = await session.execute(statement, rows)
    numbers = [seq for seq in result.scalars() if seq is not None]
    return max(numbers) if numbers else None


def _upsert(insert: Any, *, numbered: bool) -> Any:
    """The upsert of record(), built once per dialect: building it per call cost a compile."""
    table = Revocation.__table__
    statement = insert(table)
    excluded = statement.excluded
    changes: dict[str, Any] = {
        "expires_at": _greatest(table.c.expires_at, excluded.expires_at),
        "cutoff_ms": _greatest(table.c.cutoff_ms, excluded.cutoff_ms),
        "created_at": excluded.created_at,
        "user_id": func.coalesce(excluded.user_id, table.c.user_id),
        "user_group": func.coalesce(excluded.user_group, table.c.user_group),
    }
    if numbered:
        changes["seq"] = func.nextval(SEQUENCE)
    return statement.on_conflict_do_update(
        index_elements=[table.c.kind, table.c.subject], set_=changes
    ).returning(table.c.seq)


def _greatest(current: Any, proposed: Any) -> Any:
    """SQL for the larger of two values, where the current one may be NULL."""
    return case((or_(current.is_(None), proposed > current), proposed), else_=current)


# SQLite numbers nothing: its revocations carry no seq.
_UPSERTS = {
    "postgresql": _upsert(pg_insert, numbered=True),
    "sqlite": _upsert(sqlite_insert, numbered=False),
}


async def stream_active(
    session: AsyncSession, *, after_seq: int | None = None, groups: Iterable[int] | None = None
) -> AsyncIterator[Entry]:
    """Yield every revocation that still covers a usable token, or those Redis may lack.

    With after_seq, only those numbered after it, and those recorded up to COMMIT_SKEW
    before it was: numbers are taken at insert, so a transaction that took a lower one
    may have committed, and reached Redis, after a higher one. With groups, only those of
    these groups of users, and those whose user is unknown (they belong to every group).
    """
    query = select(
        Revocation.kind,
        Revocation.subject,
        Revocation.expires_at,
        Revocation.cutoff_ms,
        Revocation.user_id,
    ).where(Revocation.expires_at > utcnow())
    if groups is not None:
        query = query.where(
            or_(Revocation.user_group.in_(list(groups)), Revocation.user_group.is_(None))
        )
    if after_seq:
        recorded = await recorded_at(session, seq=after_seq)
        later = Revocation.seq > after_seq
        if recorded is not None:
            later = or_(later, Revocation.created_at >= recorded - COMMIT_SKEW)
        query = query.where(later)
    result = await session.stream(query.execution_options(yield_per=STREAM_BATCH))
    async for rows in result.partitions():
        for kind, subject, expires_at, cutoff_ms, user_id in rows:
            yield Entry(Kind(kind), subject, int(expires_at.timestamp()), cutoff_ms, user_id)


async def latest_seq(session: AsyncSession, *, recorded_before: datetime | None = None) -> int:
    """The highest number of a recorded revocation (recorded before a moment); 0 if none."""
    query = select(func.max(Revocation.seq))
    if recorded_before is not None:
        query = query.where(Revocation.created_at < recorded_before)
    return int(await session.scalar(query) or 0)


# Per group, the highest number, found by one probe of ix_revocations_user_group_seq.
GROUP_SEQS = text(
    """
    SELECT g.n, (SELECT r.seq FROM revocations r
                 WHERE r.user_group = g.n AND r.created_at < :before
                 ORDER BY r.seq DESC LIMIT 1)
    FROM generate_series(0, CAST(:last AS integer)) AS g(n)
    """
)
UNGROUPED_SEQ = text(
    """
    SELECT r.seq FROM revocations r
    WHERE r.user_group IS NULL AND r.created_at < :before
    ORDER BY r.seq DESC LIMIT 1
    """
)


async def latest_group_seqs(
    session: AsyncSession, *, recorded_before: datetime | None = None
) -> list[int]:
    """For each group of users, the highest number of its revocations (see latest_seq).

    A revocation whose user is unknown counts in every group: it is loaded into every one.
    """
    before = recorded_before or datetime.max.replace(tzinfo=UTC)
    if session.get_bind().dialect.name != "postgresql":
        return [0] * GROUPS  # nothing is numbered
    rows = await session.execute(GROUP_SEQS, {"before": before, "last": GROUPS - 1})
    seqs = [0] * GROUPS
    for group, seq in rows:
        seqs[group] = int(seq or 0)
    ungrouped = int(await session.scalar(UNGROUPED_SEQ, {"before": before}) or 0)
    return [max(seq, ungrouped) for seq in seqs]


async def recorded_at(session: AsyncSession, *, seq: int) -> datetime | None:
    """When the revocation numbered seq (or the last one before it) was recorded."""
    return await session.scalar(
        select(Revocation.created_at)
        .where(Revocation.seq <= seq)
        .order_by(Revocation.seq.desc())
        .limit(1)
    )


async def purge_expired(session: AsyncSession) -> int:
    """Delete revocations whose tokens have all expired; returns how many."""
    result = await session.execute(delete(Revocation).where(Revocation.expires_at <= utcnow()))
    return int(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Unwritten:
    """Revocations Redis may lack: every one numbered above after, of these groups."""

    after: int
    groups: frozenset[int]

    @classmethod
    def of(cls, entries: list[Entry], seq: int | None) -> Unwritten:
        """What a failed write of entries, recorded with highest number seq, may have left out.

        Its other entries took lower numbers in the same commit: stream_active's
        COMMIT_SKEW brings them along. Nothing numbered (SQLite): everything.
        """
        owners = [entry.owner for entry in entries]
        if any(owner is None for owner in owners):
            groups = frozenset(range(GROUPS))
        else:
            groups = frozenset(group_of(owner) for owner in owners if owner is not None)
        return cls(after=max((seq or 0) - 1, 0), groups=groups)

    def __or__(self, other: Unwritten | None) -> Unwritten:
        """What either may have left out."""
        if other is None:
            return self
        return Unwritten(after=min(self.after, other.after), groups=self.groups | other.groups)


def mark_unwritten(session: AsyncSession, unwritten: Unwritten) -> None:
    """Record that Redis may lack what unwritten names, for any worker to write back."""
    groups = " ".join(str(group) for group in sorted(unwritten.groups))
    session.add(UnwrittenRevocations(after_seq=unwritten.after, user_groups=groups))


async def has_unwritten_marks(session: AsyncSession) -> bool:
    """Whether any mark waits to be written back (every worker asks every second)."""
    return await session.scalar(select(UnwrittenRevocations.id).limit(1)) is not None


async def unwritten_marks(session: AsyncSession) -> tuple[int, Unwritten] | None:
    """The newest mark's id and what all the marks name together; None if there are none.

    Aggregated here, as an outage can leave one mark per revocation it saw.
    """
    marks = UnwrittenRevocations
    row = (await session.execute(select(func.max(marks.id), func.min(marks.after_seq)))).one()
    newest: int | None = row[0]
    after: int | None = row[1]
    if newest is None or after is None:
        return None
    listed = await session.scalars(select(marks.user_groups).where(marks.id <= newest).distinct())
    groups = frozenset(int(group) for text in listed for group in text.split())
    return int(newest), Unwritten(after=int(after), groups=groups)


async def drop_unwritten_marks(session: AsyncSession, *, up_to: int) -> None:
    """Drop the marks written back: those up to that id (later ones stay)."""
    await session.execute(delete(UnwrittenRevocations).where(UnwrittenRevocations.id <= up_to))

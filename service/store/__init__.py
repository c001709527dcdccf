"""Storage behind one object: the database, the blocklist, and revocations spanning both."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

from flask import Flask, current_app
from sqlalchemy.ext.asyncio import AsyncSession

from service import metrics
from service.config import Settings
from service.loop import WorkerLoop
from service.store import sessions as session_store
from service.store.blocklist import (
    Blocklist,
    BlocklistUnavailable,
    Entry,
    Kind,
    RedisBlocklist,
    TokenRef,
    Verdict,
    nobody,
)
from service.store.cluster_blocklist import ClusterBlocklist
from service.store.db import Database
from service.store.group_commit import GroupCommit
from service.store.groups import GROUPS, group_of
from service.store.memory_blocklist import MemoryBlocklist
from service.store.models import utcnow
from service.store.redis_target import Topology, parse_target
from service.store.revocations import (
    Unwritten,
    drop_unwritten_marks,
    has_unwritten_marks,
    latest_group_seqs,
    latest_seq,
    mark_unwritten,
    purge_expired,
    record,
    stream_active,
    unwritten_marks,
)

RECOVERY_INTERVAL = 0.5
VERIFY_INTERVAL = 1.0
# A revocation recorded this long ago has reached Redis, unless Redis lost it (or its
# writer could not reach Redis): verification compares Redis's seq with those only.
VERIFY_GRACE = timedelta(seconds=2)
PURGE_INTERVAL = 3600.0

log = logging.getLogger(__name__)


class Store:
    """App-scoped storage: created unbound, its connections opened lazily per process."""

    def __init__(self, settings: Settings, loop: WorkerLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.db = Database(settings)
        self.blocklist: Blocklist = _make_blocklist(settings)
        self._recovery: Future[bool] | None = None
        self._recovery_started = 0.0
        self._recovery_lock = threading.Lock()
        # Counts the moments this process may know of revocations Redis lacks (a write or
        # a check failed); while one is not cleared, checks it covers fail closed.
        self._doubts = 0
        # The groups of users each doubt not yet cleared covers, by its number (None: all).
        # On one server every doubt covers all; on a Cluster a failed write covers the
        # groups it wrote and a failed check its token's group, so that users whose shard
        # answers are not refused for another shard's failure.
        self._doubted: dict[int, frozenset[int] | None] = {}
        # Revocations recorded here that Redis may not have taken, by the doubt they
        # raised: a later write (anyone's) can raise Redis's seq past them, so recovery
        # writes them back by these, not by comparing numbers.
        self._unwritten: dict[int, Unwritten] = {}
        self._maintenance: list[Future[None]] = []
        self._session_revocations = GroupCommit(self._revoke_sessions)

    async def revoke_session(self, sid: str, reason: str) -> None:
        """Revoke every token of one login session, durably and in the blocklist.

        Logouts that arrive together share one commit and one blocklist write.
        """
        await self._session_revocations.submit((sid, reason))

    async def _revoke_sessions(self, batch: list[tuple[str, str]]) -> None:
        async with self.revoking() as (session, revocations):
            closed: dict[str, tuple[datetime, uuid.UUID]] = {}
            for reason in dict.fromkeys(reason for _, reason in batch):
                sids = list(dict.fromkeys(sid for sid, why in batch if why == reason))
                closed |= await session_store.close_sessions(session, sids=sids, reason=reason)
            # An unknown session (a token of a deleted user, say) is revoked for as long
            # as any of its tokens may live.
            longest = int(time.time()) + self.settings.refresh_token_ttl
            for sid in dict.fromkeys(sid for sid, _ in batch):
                expires_at, user_id = closed.get(sid, (None, None))
                until = int(expires_at.timestamp()) if expires_at else longest
                user = None if user_id is None else str(user_id)
                revocations.append(
                    Entry(kind=Kind.SESSION, subject=sid, expires_at=until, user=user)
                )
            for _, reason in batch:  # counted once recorded, also if Redis then fails (202)
                metrics.revoked(reason)

    async def revoke(self, entries: Iterable[Entry]) -> None:
        """Persist revocations, then put them in force; returns once both are done."""
        async with self.revoking() as (_, pending):
            pending.extend(entries)

    @asynccontextmanager
    async def revoking(self) -> AsyncIterator[tuple[AsyncSession, list[Entry]]]:
        """A transaction whose revocations (appended to the list) commit with it.

        They are recorded in the same commit as the caller's own writes, and put in force
        in the blocklist once that commit succeeded; the block returns after both. When
        Redis cannot take them, BlocklistUnavailable is raised after the commit: they are
        recorded, and reach Redis with the next recovery (see recover).
        """
        entries: list[Entry] = []
        async with self.db.session() as session:
            yield session, entries
            seq = await record(session, entries=entries)
        if entries:
            try:
                await self.blocklist.add(entries, seq=seq)
            except BaseException as exc:  # whatever stopped it, Redis may lack what was recorded
                unwritten = Unwritten.of(entries, seq)
                self._doubt(unwritten.groups, unwritten)
                if isinstance(exc, Exception):  # not when cancelled: nothing may wait then
                    await self._mark_unwritten(unwritten)
                raise

    async def _mark_unwritten(self, unwritten: Unwritten) -> None:
        """Leave a durable mark of what Redis may lack, for any worker to write back.

        Without it only this process would know: a worker cut off from Redis while the
        others reach it, or a command that exits, and a later write's seq hides the gap.
        """
        try:
            async with self.db.session() as session:
                mark_unwritten(session, unwritten)
        except Exception as exc:  # this process still remembers it (self._unwritten)
            log.warning("could not mark revocations Redis may lack: %s", type(exc).__name__)

    async def check(self, ref: TokenRef) -> Verdict:
        """The per-request revocation check; fails closed while Redis may lack a revocation."""
        try:
            return self._settle(await self.blocklist.check(ref), ref)
        except BlocklistUnavailable:
            self._doubt(frozenset({group_of(ref.sub)}))
            raise

    def verdict(self, ref: TokenRef) -> Verdict:
        """The same check for code that cannot await (the token loader, Authlib's hooks).

        On the loop's thread it answers from memory when it can, else waits suspended (see
        WorkerLoop.run); a thread (the hashing lane's) always waits for the loop's answer,
        as the kept verdicts and the feed belong to the loop.
        """
        if not self.loop.in_loop_thread():
            return self.loop.run(self.check(ref))
        known = self.blocklist.known(ref)
        if known is None:
            return self.loop.run(self.check(ref))
        return self._settle(known, ref)

    async def probe(self) -> bool:
        """Whether a check would pass now: the check script itself, under Redis's ACL.

        On a Cluster, for one group: a failure doubts that group, as a request's would.
        """
        ref = nobody()
        try:
            return self._settle(await self.blocklist.probe(ref), ref) is Verdict.VALID
        except BlocklistUnavailable:
            self._doubt(frozenset({group_of(ref.sub)}))
            raise

    def _settle(self, verdict: Verdict, ref: TokenRef) -> Verdict:
        if verdict is Verdict.NOT_LOADED or (self._doubted and self._doubts_cover(ref)):
            # Not loaded, or older than a revocation this process saw, or Redis failed
            # here since the last recovery: it may lack one; answer 503 until recovered.
            self.request_recovery()
            return Verdict.NOT_LOADED
        return verdict

    def _doubts_cover(self, ref: TokenRef) -> bool:
        """Whether a doubt not yet cleared covers ref's group."""
        group = group_of(ref.sub)
        with self._recovery_lock:
            return any(groups is None or group in groups for groups in self._doubted.values())

    def _doubt(self, groups: frozenset[int], unwritten: Unwritten | None = None) -> None:
        """Note that Redis may lack a revocation, of these groups on a Cluster."""
        with self._recovery_lock:
            if not self._doubted:
                metrics.doubting_redis(True)
            self._doubts += 1
            cluster = isinstance(self.blocklist, ClusterBlocklist)
            self._doubted[self._doubts] = groups if cluster else None
            if unwritten is not None:
                self._unwritten[self._doubts] = unwritten

    def _unwritten_up_to(self, doubts: int) -> Unwritten | None:
        """All that the failed writes up to that doubt may have left out of Redis."""
        with self._recovery_lock:
            failed = [value for number, value in self._unwritten.items() if number <= doubts]
        if not failed:
            return None
        return Unwritten(
            after=min(value.after for value in failed),
            groups=frozenset().union(*(value.groups for value in failed)),
        )

    def request_recovery(self) -> None:
        """Start a recovery on the loop unless one is running or just ran (no wait)."""
        with self._recovery_lock:
            running = self._recovery is not None and not self._recovery.done()
            if running or time.monotonic() - self._recovery_started < RECOVERY_INTERVAL:
                return
            self._recovery_started = time.monotonic()
            self._recovery = self.loop.submit(self._recover_logged())

    async def _recover_logged(self) -> bool:
        try:
            return await self.recover()
        except Exception as exc:
            log.warning("blocklist recovery failed (%s); will retry", failure_reason(exc))
            return False

    async def recover(self) -> bool:
        """Make Redis hold every recorded revocation again, if it may not; True once it does.

        Redis may lack revocations after a restart (not loaded), after going back to an
        older copy of its data (its seq is below one this process saw, or below what
        PostgreSQL recorded over VERIFY_GRACE ago), or when a write could not reach it.
        An older copy is first marked not loaded, so every worker fails closed meanwhile;
        then what it may lack is written again, streamed in batches.
        """
        if isinstance(self.blocklist, ClusterBlocklist):
            return await self._recover_groups(self.blocklist)
        doubts = self._doubts
        # The floor as it was before Redis is read: a write answered while it is read
        # raises the floor past the seq read, and Redis would seem to have gone back.
        floor = self.blocklist.floor
        state = await self.blocklist.state()
        async with self.db.session() as session:
            latest = await latest_seq(session)
            settled = await latest_seq(session, recorded_before=utcnow() - VERIFY_GRACE)
            marks = await unwritten_marks(session)
        unwritten = self._with_marks(self._unwritten_up_to(doubts), marks)
        went_back = state.seq < max(floor, settled)
        if state.loaded and not went_back and state.seq >= latest and unwritten is None:
            self._cleared(doubts)
            self.blocklist.raise_floor(state.seq)
            return True
        if went_back and state.loaded:
            log.error(
                "Redis holds revocations up to #%d, not #%d: it went back to older data or "
                "a worker could not reach it; reloading, every check fails closed until then",
                state.seq,
                max(floor, settled),
            )
            await self.blocklist.invalidate()
        after = state.seq if unwritten is None else min(state.seq, unwritten.after)
        started = time.monotonic()
        async with self.db.session() as session:
            done = await self.blocklist.rebuild(stream_active(session, after_seq=after), seq=latest)
        if done:
            await self._written_back(doubts, marks)
            # Loading a new or restarted Redis is routine; catching up on writes it missed
            # while loaded means some part of the service could not reach it.
            log.log(
                logging.WARNING if state.loaded else logging.INFO,
                "blocklist loaded from the durable record after #%d in %.2f s",
                after,
                time.monotonic() - started,
            )
        return done

    async def _recover_groups(self, blocklist: ClusterBlocklist) -> bool:
        """recover, group by group, on a Redis Cluster: only groups that may lack one reload.

        Each group has its own ready, seq and floor, and PostgreSQL its own highest number
        per group; a failover of one shard leaves the groups of the others loaded. The
        groups of a node that does not answer are left for a later round, and doubts of
        the other groups are cleared meanwhile; True once every group is verified.
        """
        doubts = self._doubts
        floors = blocklist.floors()  # before Redis is read (see recover)
        states = await blocklist.group_states()
        async with self.db.session() as session:
            latest = await latest_group_seqs(session)
            settled = await latest_group_seqs(session, recorded_before=utcnow() - VERIFY_GRACE)
            marks = await unwritten_marks(session)
        unwritten = self._with_marks(self._unwritten_up_to(doubts), marks)
        answered = frozenset(group for group, state in enumerate(states) if state is not None)
        stale: dict[int, int] = {}
        went_back: list[int] = []
        for group, state in enumerate(states):
            if state is None:
                continue
            back = state.seq < max(floors[group], settled[group])
            missed = unwritten is not None and group in unwritten.groups
            if state.loaded and not back and state.seq >= latest[group] and not missed:
                blocklist.raise_group_floor(group, state.seq)
                continue
            stale[group] = min(state.seq, unwritten.after) if missed and unwritten else state.seq
            if back and state.loaded:
                went_back.append(group)
        if not stale:
            await self._written_back(doubts, marks, answered)
            return len(answered) == GROUPS
        if went_back:
            log.error(
                "Redis lost revocations in %d groups of users: reloading them, their checks "
                "fail closed until then",
                len(went_back),
            )
            await blocklist.invalidate_groups(went_back)
        started = time.monotonic()
        async with self.db.session() as session:
            entries = stream_active(session, after_seq=min(stale.values()), groups=stale)
            done = await blocklist.rebuild_groups(entries, {g: latest[g] for g in stale})
        await self._written_back(doubts, marks, answered - (set(stale) - done))
        log.log(
            logging.WARNING if went_back else logging.INFO,
            "blocklist loaded from the durable record into %d groups in %.2f s",
            len(done),
            time.monotonic() - started,
        )
        return done == set(stale) and len(answered) == GROUPS

    @staticmethod
    def _with_marks(
        unwritten: Unwritten | None, marks: tuple[int, Unwritten] | None
    ) -> Unwritten | None:
        """What this process and the durable marks say Redis may lack, together."""
        if marks is None:
            return unwritten
        return marks[1] | unwritten

    async def _written_back(
        self,
        doubts: int,
        marks: tuple[int, Unwritten] | None,
        verified: frozenset[int] | None = None,
    ) -> None:
        """Redis holds all that was doubted up to doubts, and all that marks named.

        On a Cluster, only in the groups verified: doubts and marks of others stay.
        """
        self._cleared(doubts, verified)
        if marks is not None and _covers(verified, marks[1].groups):
            async with self.db.session() as session:
                await drop_unwritten_marks(session, up_to=marks[0])

    def _cleared(self, doubts: int, verified: frozenset[int] | None = None) -> None:
        with self._recovery_lock:
            doubted = bool(self._doubted)
            for number, unwritten in list(self._unwritten.items()):
                if number <= doubts and _covers(verified, unwritten.groups):
                    del self._unwritten[number]
            for number, groups in list(self._doubted.items()):
                if number <= doubts and _covers(verified, groups):
                    del self._doubted[number]
            if doubted and not self._doubted:
                metrics.doubting_redis(False)

    async def verify(self) -> None:
        """Recover now if Redis may lack a revocation (see recover); else only note its seq."""
        if isinstance(self.blocklist, ClusterBlocklist):
            await self._verify_groups(self.blocklist)
            return
        floor = self.blocklist.floor  # before Redis is read (see recover)
        state = await self.blocklist.state()
        async with self.db.session() as session:
            settled = await latest_seq(session, recorded_before=utcnow() - VERIFY_GRACE)
            behind = await self._behind(session)
        if not state.loaded or behind or state.seq < max(floor, settled):
            await self.recover()
        else:
            self.blocklist.raise_floor(state.seq)

    async def _behind(self, session: AsyncSession) -> bool:
        """Whether a write failed here since the last recovery, or anywhere (a mark waits)."""
        return bool(self._doubted) or await has_unwritten_marks(session)

    async def _verify_groups(self, blocklist: ClusterBlocklist) -> None:
        """verify, group by group (see _recover_groups)."""
        floors = blocklist.floors()
        states = await blocklist.group_states()
        async with self.db.session() as session:
            settled = await latest_group_seqs(session, recorded_before=utcnow() - VERIFY_GRACE)
            behind = await self._behind(session)
        if behind or any(
            state is None or not state.loaded or state.seq < max(floors[group], settled[group])
            for group, state in enumerate(states)
        ):
            await self.recover()
            return
        for group, state in enumerate(states):
            if state is not None:
                blocklist.raise_group_floor(group, state.seq)

    async def warm_up(self) -> None:
        """Connect to both backends and make sure the blocklist holds every revocation."""
        await self.db.ping()
        if isinstance(self.blocklist, RedisBlocklist):
            policy = await self.blocklist.eviction_policy()
            if policy not in (None, "noeviction"):
                # Evicted entries would let revoked tokens back in, silently.
                log.error("Redis maxmemory-policy is %s: set it to noeviction", policy)
        await self.recover()

    async def purge(self) -> int:
        """Drop durable revocations that no longer cover any usable token."""
        async with self.db.session() as session:
            return await purge_expired(session)

    def start_maintenance(self) -> None:
        """Verify the blocklist every VERIFY_INTERVAL and purge expired revocations hourly."""
        if not self._maintenance:
            self._maintenance = [
                self.loop.submit(_every(VERIFY_INTERVAL, self.verify, "verifying the blocklist")),
                self.loop.submit(_every(PURGE_INTERVAL, self._purge_logged, "purging")),
            ]

    async def _purge_logged(self) -> None:
        log.info("purged %d expired revocations", await self.purge())

    async def close(self) -> None:
        """Release this process's connections."""
        for task in self._maintenance:
            task.cancel()
        self._maintenance = []
        if self._doubted:  # a worker that stops doubts nothing any more
            metrics.doubting_redis(False)
        await self.blocklist.close()
        await self.db.dispose()


def failure_reason(exc: Exception) -> str:
    """What to log of a failure: the cause a BlocklistUnavailable names, else the type."""
    return str(exc) if isinstance(exc, BlocklistUnavailable) else type(exc).__name__


def _covers(verified: frozenset[int] | None, groups: frozenset[int] | None) -> bool:
    """Whether the groups verified (None: all) include groups (None: all)."""
    if verified is None:
        return True
    return len(verified) == GROUPS if groups is None else groups <= verified


async def _every(seconds: float, job: Callable[[], Awaitable[object]], what: str) -> None:
    """Run job every so many seconds, for ever; a failed round is logged and tried again."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception as exc:  # the next round tries again
            log.warning("%s failed: %s", what, failure_reason(exc))


def _make_blocklist(settings: Settings) -> Blocklist:
    if settings.redis_url is None:
        return MemoryBlocklist()
    cluster = parse_target(settings.redis_url).topology is Topology.CLUSTER
    return (ClusterBlocklist if cluster else RedisBlocklist)(
        settings.redis_url,
        prefix=settings.redis_prefix,
        shards=settings.revocation_shards,
        bucket_seconds=settings.revocation_bucket_seconds,
        session_bucket_seconds=settings.revocation_session_bucket_seconds,
        timeout=settings.redis_timeout,
        max_connections=settings.redis_pool_size,
        propagation=settings.revocation_propagation_ms / 1000,
        kept_verdicts=settings.verified_token_memo,
    )


def get_store() -> Store:
    """The store of the current app."""
    store: Store = current_app.extensions["store"]
    return store


def init_app(app: Flask, settings: Settings, loop: WorkerLoop) -> Store:
    """Attach a store to app."""
    store = Store(settings, loop)
    app.extensions["store"] = store
    return store

"""Storage behind one object: the database, the blocklist, and revocations spanning both."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from datetime import timedelta

from flask import Flask, current_app
from sqlalchemy.ext.asyncio import AsyncSession

from service import metrics
from service.config import Settings
from service.loop import LoopThread
from service.store.blocklist import (
    Blocklist,
    BlocklistUnavailable,
    Entry,
    RedisBlocklist,
    TokenRef,
    Verdict,
)
from service.store.db import Database
from service.store.memory_blocklist import MemoryBlocklist
from service.store.models import utcnow
from service.store.revocations import latest_seq, purge_expired, record, stream_active

RECOVERY_INTERVAL = 0.5
VERIFY_INTERVAL = 1.0
# A revocation recorded this long ago has reached Redis, unless Redis lost it (or its
# writer could not reach Redis): verification compares Redis's seq with those only.
VERIFY_GRACE = timedelta(seconds=2)
PURGE_INTERVAL = 3600.0

log = logging.getLogger(__name__)


class Store:
    """App-scoped storage: created unbound, its connections opened lazily per process."""

    def __init__(self, settings: Settings, loop: LoopThread) -> None:
        self.settings = settings
        self.loop = loop
        self.db = Database(settings)
        self.blocklist: Blocklist = _make_blocklist(settings)
        self._recovery: Future[bool] | None = None
        self._recovery_started = 0.0
        self._recovery_lock = threading.Lock()
        # Counts the moments this process may know of revocations Redis lacks (a write or
        # a check failed); while it moves, checks here fail closed.
        self._doubts = 0
        self._doubts_cleared = 0
        self._maintenance: list[Future[None]] = []

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
            except BlocklistUnavailable:
                self._doubt()
                raise

    @metrics.timed_check
    def check(self, ref: TokenRef) -> Verdict:
        """The per-request revocation check; fails closed while Redis may lack a revocation."""
        return self._settled(lambda: self.blocklist.check(ref))

    async def check_async(self, ref: TokenRef) -> Verdict:
        """The same check, awaited on the server's event loop."""
        try:
            return self._settle(await self.blocklist.check_async(ref))
        except BlocklistUnavailable:
            self._doubt()
            raise

    def probe(self) -> bool:
        """Whether a check would pass now: the check script itself, under Redis's ACL."""
        return self._settled(self.blocklist.probe) is Verdict.VALID

    def _settled(self, ask: Callable[[], Verdict]) -> Verdict:
        """The verdict ask() gives, settled as every check is."""
        try:
            return self._settle(ask())
        except BlocklistUnavailable:
            self._doubt()
            raise

    def _settle(self, verdict: Verdict) -> Verdict:
        if verdict is Verdict.NOT_LOADED or self._doubts != self._doubts_cleared:
            # Not loaded, or older than a revocation this process saw, or Redis failed
            # here since the last recovery: it may lack one; answer 503 until recovered.
            self.request_recovery()
            return Verdict.NOT_LOADED
        return verdict

    def _doubt(self) -> None:
        with self._recovery_lock:
            self._doubts += 1

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
            log.warning("blocklist recovery failed (%s); will retry", type(exc).__name__)
            return False

    async def recover(self) -> bool:
        """Make Redis hold every recorded revocation again, if it may not; True once it does.

        Redis may lack revocations after a restart (not loaded), after going back to an
        older copy of its data (its seq is below one this process saw, or below what
        PostgreSQL recorded over VERIFY_GRACE ago), or when a write could not reach it.
        An older copy is first marked not loaded, so every worker fails closed meanwhile;
        then what it may lack is written again, streamed in batches.
        """
        doubts = self._doubts
        state = await self.blocklist.state()
        async with self.db.session() as session:
            latest = await latest_seq(session)
            settled = await latest_seq(session, recorded_before=utcnow() - VERIFY_GRACE)
        went_back = state.seq < max(self.blocklist.floor, settled)
        if state.loaded and not went_back and state.seq >= latest:
            self._cleared(doubts)
            self.blocklist.raise_floor(state.seq)
            return True
        if went_back and state.loaded:
            log.error(
                "Redis holds revocations up to #%d, not #%d: it went back to older data or "
                "a worker could not reach it; reloading, every check fails closed until then",
                state.seq,
                max(self.blocklist.floor, settled),
            )
            await self.blocklist.invalidate()
        started = time.monotonic()
        async with self.db.session() as session:
            done = await self.blocklist.rebuild(
                stream_active(session, after_seq=state.seq), seq=latest
            )
        if done:
            self._cleared(doubts)
            # Loading a new or restarted Redis is routine; catching up on writes it missed
            # while loaded means some part of the service could not reach it.
            log.log(
                logging.WARNING if state.loaded else logging.INFO,
                "blocklist loaded from the durable record after #%d in %.2f s",
                state.seq,
                time.monotonic() - started,
            )
        return done

    def _cleared(self, doubts: int) -> None:
        with self._recovery_lock:
            self._doubts_cleared = max(self._doubts_cleared, doubts)

    async def verify(self) -> None:
        """Recover now if Redis may lack a revocation (see recover); else only note its seq."""
        state = await self.blocklist.state()
        async with self.db.session() as session:
            settled = await latest_seq(session, recorded_before=utcnow() - VERIFY_GRACE)
        behind = self._doubts != self._doubts_cleared
        if not state.loaded or behind or state.seq < max(self.blocklist.floor, settled):
            await self.recover()
        else:
            self.blocklist.raise_floor(state.seq)

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
        await self.blocklist.close()
        await self.db.dispose()


async def _every(seconds: float, job: Callable[[], Awaitable[object]], what: str) -> None:
    """Run job every so many seconds, for ever; a failed round is logged and tried again."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception as exc:  # the next round tries again
            log.warning("%s failed: %s", what, type(exc).__name__)


def _make_blocklist(settings: Settings) -> Blocklist:
    if settings.redis_url is None:
        return MemoryBlocklist()
    return RedisBlocklist(
        settings.redis_url,
        prefix=settings.redis_prefix,
        shards=settings.revocation_shards,
        bucket_seconds=settings.revocation_bucket_seconds,
        session_bucket_seconds=settings.revocation_session_bucket_seconds,
        timeout=settings.redis_timeout,
        max_connections=settings.request_threads + 8,
        propagation=settings.revocation_propagation_ms / 1000,
        kept_verdicts=settings.verified_token_memo,
    )


def get_store() -> Store:
    """The store of the current app."""
    store: Store = current_app.extensions["store"]
    return store


def init_app(app: Flask, settings: Settings, loop: LoopThread) -> Store:
    """Attach a store to app."""
    store = Store(settings, loop)
    app.extensions["store"] = store
    return store

"""Storage behind one object: the database, the blocklist, and revocations spanning both."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Future
from contextlib import asynccontextmanager

from flask import Flask, current_app
from sqlalchemy.ext.asyncio import AsyncSession

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
from service.store.revocations import purge_expired, record, stream_active

REBUILD_INTERVAL = 0.5
REAPPLY_FIRST_DELAY = 0.05
REAPPLY_MAX_DELAY = 1.0
PURGE_INTERVAL = 3600.0

log = logging.getLogger(__name__)


class Store:
    """App-scoped storage: created unbound, its connections opened lazily per process."""

    def __init__(self, settings: Settings, loop: LoopThread) -> None:
        self.settings = settings
        self.loop = loop
        self.db = Database(settings)
        self.blocklist: Blocklist = _make_blocklist(settings)
        self._rebuild: Future[bool] | None = None
        self._rebuild_started = 0.0
        self._rebuild_lock = threading.Lock()
        self._unapplied: list[Entry] = []
        self._reapply: Future[None] | None = None
        self._maintenance: Future[None] | None = None

    async def revoke(self, entries: Iterable[Entry]) -> None:
        """Persist revocations, then put them in force; returns once both are done."""
        async with self.revoking() as (_, pending):
            pending.extend(entries)

    @asynccontextmanager
    async def revoking(self) -> AsyncIterator[tuple[AsyncSession, list[Entry]]]:
        """A transaction whose revocations (appended to the list) commit with it.

        They are recorded in the same commit as the caller's own writes, and put in force
        in the blocklist once that commit succeeded; the block returns after both.
        """
        entries: list[Entry] = []
        async with self.db.session() as session:
            yield session, entries
            await record(session, entries=entries)
        await self._put_in_force(entries)

    async def _put_in_force(self, entries: list[Entry]) -> None:
        if not entries:
            return
        try:
            await self.blocklist.add(entries)
        except BlocklistUnavailable:
            # Recorded but not in force: keep retrying until Redis takes them.
            with self._rebuild_lock:
                self._unapplied.extend(entries)
                if self._reapply is None or self._reapply.done():
                    self._reapply = self.loop.submit(self._reapply_until_done())
            raise

    async def _reapply_until_done(self) -> None:
        delay = REAPPLY_FIRST_DELAY
        while True:
            await asyncio.sleep(delay)
            with self._rebuild_lock:
                pending = list(self._unapplied)
            try:
                await self.blocklist.add(pending)
            except BlocklistUnavailable:
                delay = min(delay * 2, REAPPLY_MAX_DELAY)
                continue
            with self._rebuild_lock:
                del self._unapplied[: len(pending)]
                if not self._unapplied:
                    return

    def check(self, ref: TokenRef) -> Verdict:
        """The per-request revocation check; schedules a reload when the blocklist needs one.

        While a revocation this process recorded has not reached Redis yet, answers
        NOT_LOADED (503): the token asked about might be the one not yet in force.
        """
        return self._settle(self.blocklist.check(ref))

    async def check_async(self, ref: TokenRef) -> Verdict:
        """The same check, awaited on the server's event loop."""
        return self._settle(await self.blocklist.check_async(ref))

    def _settle(self, verdict: Verdict) -> Verdict:
        if verdict is Verdict.NOT_LOADED:
            self.request_rebuild()
        if self._unapplied:
            return Verdict.NOT_LOADED
        return verdict

    async def rebuild_blocklist(self) -> bool:
        """Reload the blocklist from the durable record (after a Redis restart, say)."""
        async with self.db.session() as session:
            return await self.blocklist.rebuild(stream_active(session))

    def request_rebuild(self) -> None:
        """Start a blocklist rebuild on the loop unless one is running or just ran (no wait)."""
        with self._rebuild_lock:
            running = self._rebuild is not None and not self._rebuild.done()
            if running or time.monotonic() - self._rebuild_started < REBUILD_INTERVAL:
                return
            self._rebuild_started = time.monotonic()
            self._rebuild = self.loop.submit(self._rebuild_logged())

    async def _rebuild_logged(self) -> bool:
        try:
            done = await self.rebuild_blocklist()
        except Exception:
            log.exception("blocklist rebuild failed; will retry on the next request")
            return False
        if done:
            log.warning("blocklist rebuilt from the durable revocation record")
        return done

    async def warm_up(self) -> None:
        """Connect to both backends and make sure the blocklist is loaded."""
        await self.db.ping()
        if isinstance(self.blocklist, RedisBlocklist):
            policy = await self.blocklist.eviction_policy()
            if policy not in (None, "noeviction"):
                # Evicted entries would let revoked tokens back in, silently.
                log.error("Redis maxmemory-policy is %s: set it to noeviction", policy)
        if not await self.blocklist.ping():
            await self.rebuild_blocklist()

    async def purge(self) -> int:
        """Drop durable revocations that no longer cover any usable token."""
        async with self.db.session() as session:
            return await purge_expired(session)

    def start_maintenance(self) -> None:
        """Purge expired durable revocations every PURGE_INTERVAL seconds, in the background."""
        if self._maintenance is None or self._maintenance.done():
            self._maintenance = self.loop.submit(self._purge_forever())

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL)
            try:
                purged = await self.purge()
            except Exception as exc:  # the next round tries again
                log.warning("purging expired revocations failed: %s", type(exc).__name__)
            else:
                log.info("purged %d expired revocations", purged)

    async def close(self) -> None:
        """Release this process's connections."""
        if self._maintenance is not None:
            self._maintenance.cancel()
        await self.blocklist.close()
        await self.db.dispose()


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

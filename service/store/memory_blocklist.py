"""In-process blocklist for development without Redis: one worker process only."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterable, Iterable

from service.store.blocklist import (
    Entry,
    Kind,
    Recalled,
    State,
    TokenRef,
    Verdict,
    keep_nothing,
    session_started_ms,
)
from service.store.revocation_feed import Subject


class MemoryBlocklist:
    """In-process blocklist for development without Redis: one worker process only."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._cutoffs: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._loaded = False

    def known(self, ref: TokenRef) -> Verdict:
        """Look the token up in memory (no I/O: the answer is always known)."""
        if not self._loaded:
            return Verdict.NOT_LOADED
        now = int(time.time())
        with self._lock:
            for subject in (ref.jti, ref.sid):
                if self._ids.get(subject, 0) >= now:
                    return Verdict.REVOKED
            cutoff, until = self._cutoffs.get(ref.sub, (0, 0))
        if until >= now and cutoff >= session_started_ms(ref):
            return Verdict.REVOKED
        return Verdict.VALID

    async def check(self, ref: TokenRef) -> Verdict:
        """The same lookup (nothing to wait for)."""
        return self.known(ref)

    async def add(self, entries: Iterable[Entry], *, seq: int | None = None) -> None:
        """Record revocations and drop the ones that have expired."""
        now = int(time.time())
        with self._lock:
            for entry in entries:
                if entry.kind is Kind.USER:
                    assert entry.cutoff_ms is not None
                    cutoff, until = self._cutoffs.get(entry.subject, (0, 0))
                    self._cutoffs[entry.subject] = (
                        max(cutoff, entry.cutoff_ms),
                        max(until, entry.expires_at),
                    )
                else:
                    self._ids[entry.subject] = max(
                        self._ids.get(entry.subject, 0), entry.expires_at
                    )
            self._ids = {key: exp for key, exp in self._ids.items() if exp >= now}

    def recall(self, subject: Subject) -> Recalled:
        """Nothing is kept: no feed tells this process of another's changes."""
        return None, keep_nothing

    async def announce(self, subjects: Iterable[Subject]) -> None:
        """Nobody to tell."""

    async def rebuild(self, entries: AsyncIterable[Entry], *, seq: int = 0) -> bool:
        """Load durable revocations (at start-up)."""
        await self.add([entry async for entry in entries])
        self._loaded = True
        return True

    async def state(self) -> State:
        """Loaded once rebuilt; process memory never goes back in time."""
        return State(loaded=self._loaded, seq=0)

    async def invalidate(self) -> None:
        """Forget the loaded mark; the next rebuild restores it."""
        self._loaded = False

    async def probe(self, ref: TokenRef) -> Verdict:
        """A lookup, as a check's."""
        return self.known(ref)

    @property
    def floor(self) -> int:
        """Nothing to compare: memory holds every write of this process."""
        return 0

    def raise_floor(self, seq: int | None) -> None:
        """Nothing to note."""

    async def close(self) -> None:
        """Nothing to release."""

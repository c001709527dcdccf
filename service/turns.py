"""A request's database turn, given back while the request waits for a password hash.

A request that may reach the database holds one of DATABASE_MAX_REQUESTS turns for its
whole view (service/isolation.py). A login waits tens to hundreds of milliseconds for
Argon2 without touching the database: holding its turn meanwhile, a login storm would take
every turn while PostgreSQL idles, and refresh, logout and token requests would wait
behind it or get 503. So the hash is waited for inside `turn_given_back()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Literal

from service.errors import ServiceUnavailable

log = logging.getLogger(__name__)

BUSY = "The database is busy or unavailable; retry shortly."
RETRY_AFTER = 2


class TurnBusy(ServiceUnavailable):
    """No database turn came back in time: 503 with Retry-After, like none at the start."""

    def __init__(self) -> None:
        super().__init__(BUSY, RETRY_AFTER)


class Turns(asyncio.Semaphore):
    """A worker's DATABASE_MAX_REQUESTS turns, counting those held."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.slots = slots
        self.held = 0

    async def acquire(self) -> Literal[True]:
        """Wait for a turn and count it held."""
        await super().acquire()
        self.held += 1
        return True

    def release(self) -> None:
        """Give a turn back."""
        self.held -= 1
        super().release()

    @property
    def free(self) -> int:
        """How many turns no request holds now."""
        return self.slots - self.held


class DatabaseTurn:
    """One request's hold on a turn: taken, given back for a while, and ended once."""

    def __init__(self, turns: asyncio.Semaphore, wait: float) -> None:
        self._turns = turns
        self._wait = wait
        self._held = False

    async def take(self) -> bool:
        """Wait for a turn, at most the pool wait; False if none came."""
        try:
            async with asyncio.timeout(self._wait):
                await self._turns.acquire()
        except TimeoutError:
            log.warning("database busy: no turn within %.1fs", self._wait)
            return False
        self._held = True
        return True

    def end(self) -> None:
        """Give the turn back if this request holds it; a second call does nothing."""
        if self._held:
            self._held = False
            self._turns.release()

    @contextlib.asynccontextmanager
    async def released(self) -> AsyncIterator[None]:
        """Give the turn back while inside, then take it again, or raise TurnBusy."""
        self.end()
        try:
            yield
        finally:
            # Even after an error or a cancellation: whatever the view does next, it does
            # holding a turn, or it fails with TurnBusy.
            if not await self.take():
                raise TurnBusy()


DATABASE_TURN: ContextVar[DatabaseTurn | None] = ContextVar("database_turn", default=None)


@contextlib.asynccontextmanager
async def turn_given_back() -> AsyncIterator[None]:
    """Inside, the current request holds no database turn (if it held one)."""
    turn = DATABASE_TURN.get()
    if turn is None:
        yield
        return
    async with turn.released():
        yield

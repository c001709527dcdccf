"""Group commit: what is submitted while one commit runs goes together into the next one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

BATCH_LIMIT = 128


class GroupCommit(Generic[T]):
    """Runs commit(items) for items submitted together; each submit returns with its commit.

    Under load, concurrent submitters share one database transaction and one Redis write
    instead of each paying for their own; alone, a submit commits at once, never waiting
    for company. A commit's failure is every submitter's. A submitter that is cancelled
    does not stop the commit its item is in.
    """

    def __init__(self, commit: Callable[[list[T]], Awaitable[None]], *, limit: int = BATCH_LIMIT):
        self._commit = commit
        self._limit = limit
        self._queue: list[tuple[T, asyncio.Future[None]]] = []
        self._running: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        """Commit item, with whatever else was submitted meanwhile."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.append((item, done))
        if self._running is None or self._running.done():
            self._running = loop.create_task(self._drain())
        await asyncio.shield(done)

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._limit], self._queue[self._limit :]
            try:
                await self._commit([item for item, _ in batch])
            except Exception as error:  # each submitter raises it
                for _, done in batch:
                    if not done.done():
                        done.set_exception(error)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

"""Keep-alive timeouts as timers, not as a task started and cancelled for every request.

Hypercorn watches an idle connection with a task that waits for the keep-alive timeout
(or the server's shutdown) and then closes it. An HTTP/1.1 connection goes idle after
every response and busy again with the next request, so each request cancelled one
task and started two (asyncio.wait_for wraps the wait in a task of its own): about 4%
of a protected GET's CPU. Each connection now arms and disarms one timer instead; a
single watcher per worker closes the idle connections at once when the server stops,
as Hypercorn's tasks did.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import hypercorn.asyncio.tcp_server
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import AsyncioSingleTask

from service.transport.shapes import Shape, differing

_stock_server_close = TCPServer._initiate_server_close  # coalesce wraps it


class IdleTimer:
    """Hypercorn's idle task for one connection (restart when idle, stop when busy)."""

    def __init__(self) -> None:
        self._timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None
        self._server: Any = None
        self._task_group: Any = None
        self._watched = False

    async def restart(self, task_group: Any, action: Callable[[], Any]) -> None:
        """Close the connection once it has been idle for the keep-alive timeout."""
        await self.stop()
        server = action.__self__  # type: ignore[attr-defined]  # the TCPServer
        self._server, self._task_group = server, task_group
        if server.context.terminated.is_set():
            self.fire()
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(server.config.keep_alive_timeout, self.fire)
        if not self._watched:
            self._watched = True
            _watch_shutdown(loop, server.context, self)

    async def stop(self) -> None:
        """The connection is busy (or closing): no timeout."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        closing, self._closing = self._closing, None
        if closing is not None:
            closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closing

    @property
    def armed(self) -> bool:
        """Whether the connection is idle and not yet being closed."""
        return self._timer is not None

    def fire(self) -> None:
        """Close the idle connection (the timeout passed, or the server is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closing is None and self._server is not None:
            closing = _shielded(self._server._initiate_server_close)
            try:
                self._closing = self._task_group._task_group.create_task(closing)
            except RuntimeError:  # the connection's task group has ended: it is closed
                closing.close()


async def _shielded(close: Callable[[], Any]) -> None:
    await asyncio.shield(close())


_timers: weakref.WeakKeyDictionary[Any, weakref.WeakSet[IdleTimer]] = weakref.WeakKeyDictionary()


def _watch_shutdown(loop: asyncio.AbstractEventLoop, context: Any, timer: IdleTimer) -> None:
    """Register the timer with its worker's one shutdown watcher (started on first use)."""
    timers = _timers.get(context)
    if timers is None:
        timers = _timers[context] = weakref.WeakSet()
        loop.create_task(_close_idle_on_shutdown(context.terminated, timers))
    timers.add(timer)


async def _close_idle_on_shutdown(terminated: Any, timers: weakref.WeakSet[IdleTimer]) -> None:
    await terminated.wait()
    for timer in list(timers):
        if timer.armed:
            timer.fire()


SHAPES = [
    Shape(
        "TCPServer.__init__",
        TCPServer.__init__,
        ["self", "app", "loop", "config", "context", "state", "reader", "writer"],
        {"AsyncioSingleTask", "idle_task", "context", "config"},
    ),
    Shape("TCPServer.run", TCPServer.run, ["self"], {"idle_task", "restart", "_idle_timeout"}),
    Shape(
        "TCPServer._idle_timeout",
        TCPServer._idle_timeout,
        ["self"],
        {"_initiate_server_close", "keep_alive_timeout", "terminated"},
    ),
    Shape("TCPServer._initiate_server_close", _stock_server_close, ["self"]),
    Shape(
        "AsyncioSingleTask.restart",
        AsyncioSingleTask.restart,
        ["self", "task_group", "action"],
        {"_task_group", "create_task"},
    ),
    Shape("AsyncioSingleTask.stop", AsyncioSingleTask.stop, ["self"]),
    Shape("TaskGroup.__init__", TaskGroup.__init__, ["self", "loop"], {"_task_group"}),
]


def shapes_differ() -> list[str]:
    """What of Hypercorn's internals this change relies on is not as it expects."""
    stock = hypercorn.asyncio.tcp_server.__dict__.get("AsyncioSingleTask")
    return differing(
        SHAPES, {"tcp_server.AsyncioSingleTask": stock in (AsyncioSingleTask, IdleTimer)}
    )


def install() -> None:
    """Give Hypercorn's asyncio connections an IdleTimer (idempotent; per process)."""
    hypercorn.asyncio.tcp_server.AsyncioSingleTask = IdleTimer  # type: ignore[attr-defined,assignment]

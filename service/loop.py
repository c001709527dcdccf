"""The worker's one event loop, where async views and every pool (asyncpg, Redis) live.

Under Hypercorn it is the server's own loop, attached at lifespan start-up; a process that
serves nothing (the CLI, a test driving the Flask app) gets a loop thread of its own on
first use. Flask would otherwise run every async view in a fresh loop, which breaks pooled
connections and costs more than the work it wraps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import greenlet

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger(__name__)


class WouldBlock(RuntimeError):
    """Work on the event loop that would have to wait for I/O: run it in a thread instead."""


_DONE, _FAILED, _WAIT = "done", "failed", "wait"
IDLE_GREENLETS = 64  # kept for reuse per thread: making one costs more than a GET's view


class _Suspendable(greenlet.greenlet):  # type: ignore[misc]
    """Runs synchronous calls on the loop, one after another; their waits suspend it."""

    def __init__(self) -> None:
        super().__init__(self._serve)

    def _serve(self, func: Callable[[], Any]) -> None:
        parent = self.parent
        assert parent is not None
        while True:
            try:
                outcome: tuple[str, Any] = (_DONE, func())
            except greenlet.GreenletExit:
                raise  # collected while suspended (the loop closed under it): just end
            except BaseException as error:  # handed to run_suspendable's caller
                outcome = (_FAILED, error)
            func = parent.switch(outcome)


_idle = threading.local()


def suspendable() -> bool:
    """Whether the caller may wait: it runs in run_suspendable on the loop."""
    return isinstance(greenlet.getcurrent(), _Suspendable)


async def run_suspendable(func: Callable[[], T]) -> T:
    """Run synchronous func on this loop; each WorkerLoop.run inside it is awaited here.

    The coroutine it waits for runs as a task in a copy of func's context, as it would
    from a thread. A request's view thus waits for PostgreSQL or Redis without a thread.
    """
    idle: list[_Suspendable] = _idle.__dict__.setdefault("greenlets", [])
    child = idle.pop() if idle else _Suspendable()
    outcome = child.switch(func)
    while outcome[0] == _WAIT:
        _, coro, context = outcome
        try:
            value = await asyncio.get_running_loop().create_task(coro, context=context)
        except BaseException as error:  # the caller of WorkerLoop.run sees it
            outcome = child.throw(error)
        else:
            outcome = child.switch(value)
    if len(idle) < IDLE_GREENLETS:
        idle.append(child)
    if outcome[0] == _FAILED:
        raise outcome[1]
    return outcome[1]  # type: ignore[no-any-return]


class WorkerLoop:
    """The process's event loop: the server's once attached, else a daemon thread's."""

    def __init__(self, name: str = "service-loop") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._owned = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """Return this process's loop, starting one on first use (and again after a fork)."""
        loop = self._loop
        if loop is not None and self._pid == os.getpid():
            return loop
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._start()
            assert self._loop is not None
            return self._loop

    def attach(self) -> None:
        """Adopt the running loop (the server's, at start-up) as this process's loop."""
        with self._lock:
            if self._owned and self._pid == os.getpid():
                raise RuntimeError("a loop thread already owns this process's pools")
            self._loop = asyncio.get_running_loop()
            self._thread = threading.current_thread()
            self._pid = os.getpid()
            self._owned = False

    def _start(self) -> None:
        loop = _new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=run, name=self._name, daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread, self._pid = loop, thread, os.getpid()
        self._owned = True

    def in_loop_thread(self) -> bool:
        """Whether the caller is this loop's own thread (where blocking would deadlock)."""
        return self._thread is threading.current_thread() and self._pid == os.getpid()

    def can_wait(self) -> bool:
        """Whether run() may wait here: off the loop's thread, or suspendable on it."""
        return suspendable() or not self.in_loop_thread()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule coro on the loop, in a copy of the caller's context, and return its future."""
        loop = self.loop
        context = contextvars.copy_context()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def start() -> None:
            if future.cancelled():
                coro.close()
                return
            task = loop.create_task(coro, context=context)
            task.add_done_callback(lambda done: _copy_outcome(done, future))
            future.add_done_callback(
                lambda f: loop.call_soon_threadsafe(task.cancel) if f.cancelled() else None
            )

        loop.call_soon_threadsafe(start)
        return future

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run coro on the loop and wait for it: from a thread, or suspended on the loop."""
        current = greenlet.getcurrent()
        if isinstance(current, _Suspendable):
            waited = coro if timeout is None else asyncio.wait_for(coro, timeout)
            parent = current.parent
            assert parent is not None
            return parent.switch((_WAIT, waited, contextvars.copy_context()))  # type: ignore[no-any-return]
        if self.in_loop_thread():
            coro.close()
            raise WouldBlock("waiting on the event loop from the event loop itself")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except BaseException:
            # A timed-out or interrupted wait must not leave the coroutine running.
            future.cancel()
            raise

    def wrap(self, func: Callable[P, Awaitable[T]]) -> Callable[P, T]:
        """Turn a coroutine function into a blocking one that runs on this loop."""

        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            return self.run(_as_coroutine(func(*args, **kwargs)))

        return call

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and join this process's own loop thread; an attached loop is the server's."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None or self._pid != os.getpid():
                return
            if self._owned:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout)
                if not thread.is_alive():
                    loop.close()
            self._loop = self._thread = self._pid = None
            self._owned = False


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _copy_outcome(task: asyncio.Task[T], future: concurrent.futures.Future[T]) -> None:
    # The future stays pending (never "running") so that the waiting thread can cancel it.
    if future.done():
        return
    try:
        if task.cancelled():
            future.cancel()
        elif (exc := task.exception()) is not None:
            future.set_exception(exc)
        else:
            future.set_result(task.result())
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by the waiter in the meantime


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """Prefer uvloop where it is installed: it is the faster loop on Linux."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()

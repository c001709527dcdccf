"""Synchronous code on the event loop: its waits suspend it, and the loop serves others."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from service.loop import WorkerLoop, WouldBlock, run_suspendable, suspendable

REQUEST = contextvars.ContextVar("request", default="none")


@pytest.fixture
async def loop() -> WorkerLoop:
    attached = WorkerLoop()
    attached.attach()
    return attached


async def test_a_wait_suspends_the_caller_and_the_loop_serves_others(loop: WorkerLoop) -> None:
    order: list[str] = []

    async def slow() -> str:
        order.append("slow started")
        await asyncio.sleep(0.05)
        return "answer"

    def view() -> str:
        assert suspendable()
        assert threading.current_thread() is threading.main_thread()
        return loop.run(slow())

    async def other() -> None:
        await asyncio.sleep(0.01)
        order.append("other ran")

    answer, _ = await asyncio.gather(run_suspendable(view), other())
    assert answer == "answer"
    assert order == ["slow started", "other ran"]


async def test_errors_reach_the_waiting_code_and_the_caller(loop: WorkerLoop) -> None:
    async def failing() -> None:
        raise ConnectionError("redis went away")

    def handles() -> str:
        try:
            loop.run(failing())
        except ConnectionError as error:
            return f"handled: {error}"
        return "not raised"

    def lets_it_through() -> None:
        loop.run(failing())

    assert await run_suspendable(handles) == "handled: redis went away"
    with pytest.raises(ConnectionError):
        await run_suspendable(lets_it_through)
    assert await run_suspendable(lambda: "reused after a failure") == "reused after a failure"


async def test_a_timeout_ends_the_wait(loop: WorkerLoop) -> None:
    def view() -> None:
        loop.run(asyncio.sleep(5), timeout=0.01)

    with pytest.raises(TimeoutError):
        await run_suspendable(view)


async def test_the_awaited_coroutine_sees_the_callers_context(loop: WorkerLoop) -> None:
    async def read() -> str:
        return REQUEST.get()

    def view(name: str) -> str:
        REQUEST.set(name)
        return loop.run(read())

    answers = await asyncio.gather(*(run_suspendable(lambda n=n: view(n)) for n in "abc"))
    assert answers == ["a", "b", "c"]
    assert REQUEST.get() == "none"  # nothing leaks into the loop's own context


async def test_outside_a_request_the_loop_thread_may_not_wait(loop: WorkerLoop) -> None:
    assert not suspendable()
    assert not loop.can_wait()
    coro = asyncio.sleep(0)
    with pytest.raises(WouldBlock):
        loop.run(coro)
    assert await asyncio.to_thread(loop.can_wait)
    assert await asyncio.to_thread(loop.run, asyncio.sleep(0, result=7)) == 7

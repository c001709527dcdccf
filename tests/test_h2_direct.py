"""HTTP/2 bodies sent without Hypercorn's send task: whole, in order, and only when they fit."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from hypercorn.protocol.events import Body
from hypercorn.protocol.h2 import H2Protocol

from service import h2_direct
from tests.test_coalesce import CHUNK, serving

SMALL = b'{"message": "Hello"}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """/small answers one small body; /mixed a small chunk, large ones, then a small end."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if scope["path"] == "/small":
        await send({"type": "http.response.body", "body": SMALL + scope["path"].encode()})
        return
    await send({"type": "http.response.body", "body": b"first:", "more_body": True})
    for number in range(4):
        body = b"%d:" % number + CHUNK
        await send({"type": "http.response.body", "body": body, "more_body": True})
    await send({"type": "http.response.body", "body": b"end"})


def mixed() -> bytes:
    """The body /mixed sends."""
    return b"first:" + b"".join(b"%d:" % number + CHUNK for number in range(4)) + b"end"


@pytest.fixture
def queued_bodies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the bodies that went through Hypercorn's send task."""
    sizes: list[int] = []
    original = h2_direct._original_stream_send

    async def counting(self: Any, event: Any) -> None:
        if isinstance(event, Body):
            sizes.append(len(event.data))
        await original(self, event)

    monkeypatch.setattr(h2_direct, "_original_stream_send", counting)
    h2_direct.install()
    return sizes


async def test_small_bodies_skip_the_send_task(queued_bodies: list[int]) -> None:
    async with serving(app) as url, httpx.AsyncClient(http1=False, http2=True) as client:
        replies = await asyncio.gather(*(client.get(f"{url}small") for _ in range(50)))
    assert {reply.http_version for reply in replies} == {"HTTP/2"}
    assert [reply.content for reply in replies] == [SMALL + b"/small"] * 50
    assert queued_bodies == []
    assert H2Protocol.stream_send is h2_direct.stream_send


async def test_a_stream_that_needs_the_send_task_keeps_it(queued_bodies: list[int]) -> None:
    async with serving(app) as url, httpx.AsyncClient(http1=False, http2=True) as client:
        replies = await asyncio.gather(*(client.get(f"{url}mixed") for _ in range(6)))
        small = await client.get(f"{url}small")
    assert [reply.content for reply in replies] == [mixed()] * 6
    assert small.content == SMALL + b"/small"
    # Each stream: the first chunk went directly; every chunk after the first large one
    # (a frame is at most 16 KiB) went through the task, the small end included.
    assert sorted(queued_bodies) == sorted([len(CHUNK) + 2] * 4 * 6 + [3] * 6)


async def test_cancelled_streams_leave_the_connection_serving(queued_bodies: list[int]) -> None:
    async with serving(app) as url, httpx.AsyncClient(http1=False, http2=True) as client:
        pending = [asyncio.ensure_future(client.get(f"{url}mixed")) for _ in range(6)]
        await asyncio.sleep(0.01)
        for task in pending[::2]:
            task.cancel()
        done = await asyncio.gather(*pending, return_exceptions=True)
        after = await asyncio.gather(*(client.get(f"{url}small") for _ in range(10)))
    kept = [reply for reply in done if isinstance(reply, httpx.Response)]
    assert all(reply.content == mixed() for reply in kept)
    assert [reply.content for reply in after] == [SMALL + b"/small"] * 10

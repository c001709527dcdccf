"""HTTP/2 bodies sent without Hypercorn's send task: whole, in order, and only when they fit."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.events
import httpx
import pytest
from hypercorn.protocol.events import Body
from hypercorn.protocol.h2 import H2Protocol

from service.transport import h2_direct
from tests.h2_raw import CHUNK, exchange, serving, status

pytestmark = pytest.mark.library_change("h2_direct")

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
        replies = await asyncio.gather(*(client.get(f"{url}/small") for _ in range(50)))
    assert {reply.http_version for reply in replies} == {"HTTP/2"}
    assert [reply.content for reply in replies] == [SMALL + b"/small"] * 50
    assert queued_bodies == []
    assert H2Protocol.stream_send is h2_direct.stream_send


async def test_a_stream_that_needs_the_send_task_keeps_it(queued_bodies: list[int]) -> None:
    async with serving(app) as url, httpx.AsyncClient(http1=False, http2=True) as client:
        replies = await asyncio.gather(*(client.get(f"{url}/mixed") for _ in range(6)))
        small = await client.get(f"{url}/small")
    assert [reply.content for reply in replies] == [mixed()] * 6
    assert small.content == SMALL + b"/small"
    # Each stream: the first chunk went directly; every chunk after the first large one
    # (a frame is at most 16 KiB) went through the task, the small end included.
    assert sorted(queued_bodies) == sorted([len(CHUNK) + 2] * 4 * 6 + [3] * 6)


async def test_cancelled_streams_leave_the_connection_serving(queued_bodies: list[int]) -> None:
    async with serving(app) as url, httpx.AsyncClient(http1=False, http2=True) as client:
        # Connected first: a request cancelled while its client connects leaks the socket.
        assert (await client.get(f"{url}/small")).content == SMALL + b"/small"
        pending = [asyncio.ensure_future(client.get(f"{url}/mixed")) for _ in range(6)]
        await asyncio.sleep(0.01)
        for task in pending[::2]:
            task.cancel()
        done = await asyncio.gather(*pending, return_exceptions=True)
        after = await asyncio.gather(*(client.get(f"{url}/small") for _ in range(10)))
    kept = [reply for reply in done if isinstance(reply, httpx.Response)]
    assert all(reply.content == mixed() for reply in kept)
    assert [reply.content for reply in after] == [SMALL + b"/small"] * 10


async def framed_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """/trailers: a body, then trailers; /empty: 204; anything else: one small body."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    trailers = scope["path"] == "/trailers"
    await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": trailers})
    await send({"type": "http.response.body", "body": SMALL})
    if trailers:
        await send({"type": "http.response.trailers", "headers": [(b"x-sum", b"42")]})


def request(path: bytes, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """The header list of a GET over h2c."""
    basics = [(b":method", b"GET"), (b":path", path), (b":scheme", b"http")]
    return [*basics, (b":authority", b"127.0.0.1"), *extra]


async def test_the_last_body_carries_the_end_of_its_stream() -> None:
    h2_direct.install()
    async with serving(framed_app) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        streams = await exchange(port, [request(b"/small")] * 3)
    for events in streams:
        assert status(events) == b"200"
        data = [event for event in events if isinstance(event, h2.events.DataReceived)]
        assert [event.data for event in data] == [SMALL]
        assert data[0].stream_ended is not None  # one DATA frame, END_STREAM set on it


async def test_trailers_and_empty_responses_still_end_their_streams() -> None:
    h2_direct.install()
    te = (b"te", b"trailers")
    async with serving(framed_app) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        trailed, empty, after = await exchange(
            port, [request(b"/trailers", te), request(b"/empty"), request(b"/small")]
        )
    assert not isinstance(trailed, str) and not isinstance(empty, str)
    kinds = [type(event) for event in trailed]
    assert kinds[-2:] == [h2.events.TrailersReceived, h2.events.StreamEnded]
    body = b"".join(e.data for e in trailed if isinstance(e, h2.events.DataReceived))
    assert body == SMALL
    assert next(e for e in trailed if isinstance(e, h2.events.TrailersReceived)).headers == [
        (b"x-sum", b"42")
    ]
    assert status(empty) == b"204" and isinstance(empty[-1], h2.events.StreamEnded)
    assert status(after) == b"200"


async def test_a_body_before_the_start_is_refused_as_hypercorn_refuses_it() -> None:
    h2_direct.install()

    async def early_body(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.body", "body": b"too early"})

    async with serving(early_body) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        (events,) = await exchange(port, [request(b"/")])
    assert status(events) == b"500"  # Hypercorn's answer to an app that broke the protocol

"""Coalesced writes keep every byte, in order, through Hypercorn's own server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
from hypercorn.asyncio import serve
from hypercorn.config import Config

from service.transport import coalesce

CHUNK = bytes(range(256)) * 200  # 51,200 bytes: some writes cross FLUSH_BYTES, some not


async def chunked_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app answering with 10 numbered chunks (so that order shows), or /small."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if scope["path"] == "/small":
        await send({"type": "http.response.body", "body": b"ok"})
        return
    for number in range(10):
        await send(
            {"type": "http.response.body", "body": b"%d:" % number + CHUNK, "more_body": True}
        )
    await send({"type": "http.response.body", "body": b"end"})


@contextlib.asynccontextmanager
async def serving(app: Any = chunked_app, **settings: Any) -> AsyncIterator[str]:
    """Hypercorn (patched) serving app on a free port, in this loop; settings go to Config."""
    coalesce.install()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    for name, value in settings.items():
        setattr(config, name, value)
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    for _ in range(100):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop.set()
        await task


def expected() -> bytes:
    """The body chunked_app sends."""
    return b"".join(b"%d:" % number + CHUNK for number in range(10)) + b"end"


async def test_large_chunked_responses_arrive_whole_and_in_order() -> None:
    async with serving() as url, httpx.AsyncClient() as http:
        replies = await asyncio.gather(*(http.get(url) for _ in range(8)))
    assert all(reply.content == expected() for reply in replies)


async def test_connection_close_still_delivers_the_whole_response() -> None:
    async with serving() as url, httpx.AsyncClient() as http:
        reply = await http.get(url, headers={"connection": "close"})
    assert reply.headers["connection"] == "close"
    assert reply.content == expected()


async def test_a_small_response_leaves_in_one_write(monkeypatch: Any) -> None:
    writes: list[bytes] = []
    original = asyncio.StreamWriter.write

    def counting(self: asyncio.StreamWriter, data: bytes) -> None:
        writes.append(bytes(data))
        original(self, data)

    async with serving() as url, httpx.AsyncClient() as http:
        await http.get(url)  # connect first: only the second request's writes count
        monkeypatch.setattr(asyncio.StreamWriter, "write", counting)
        reply = await http.get(url + "small")
    assert reply.status_code == 200
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200")
    assert writes[0].endswith(b"\r\nok\r\n0\r\n\r\n")  # head, body and end in one

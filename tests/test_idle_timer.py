"""Keep-alive timeouts as timers close idle connections exactly when Hypercorn's tasks did."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import hypercorn.asyncio.tcp_server
import pytest
from hypercorn.asyncio.worker_context import AsyncioSingleTask

from service.transport import idle_timer
from tests.h2_raw import serving

REQUEST = b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """200 "ok"; /slow takes 0.6 s to answer."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(0.6)
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(
    params=[pytest.param("timer", marks=pytest.mark.library_change("idle_timer")), "hypercorn"]
)
def idle(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run each test with the timer, and with Hypercorn's own task (the behaviour to match)."""
    if request.param == "timer":
        idle_timer.install()
    else:
        monkeypatch.setattr(hypercorn.asyncio.tcp_server, "AsyncioSingleTask", AsyncioSingleTask)
    yield request.param


def port_of(url: str) -> int:
    """The port of a serving() URL."""
    return int(url.rsplit(":", 1)[1].strip("/"))


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/") -> bytes:
    """One keep-alive request; the response's body."""
    writer.write(REQUEST.replace(b"/", path.encode(), 1))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"content-length: 2" in head
    return await reader.readexactly(2)


async def closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes the connection (fails past limit)."""
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), limit) == b""
    return time.monotonic() - started


async def test_an_idle_connection_closes_after_the_keep_alive_timeout(idle: str) -> None:
    async with serving(app, keep_alive_timeout=0.3) as url:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
        assert await ask(reader, writer) == b"ok"
        waited = await closed_after(reader, 3)
        writer.close()
    assert 0.25 <= waited < 1.5


async def test_requests_in_flight_and_steady_traffic_keep_it_open(idle: str) -> None:
    async with serving(app, keep_alive_timeout=0.3) as url:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
        assert await ask(reader, writer, "/slow") == b"ok"  # busier than the timeout
        for _ in range(8):  # 0.8 s in all, never 0.3 s idle
            await asyncio.sleep(0.1)
            assert await ask(reader, writer) == b"ok"
        await closed_after(reader, 3)
        writer.close()


async def test_stopping_the_server_closes_idle_connections_at_once(idle: str) -> None:
    async with serving(app, keep_alive_timeout=60) as url:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
        assert await ask(reader, writer) == b"ok"
        started = time.monotonic()
    # serving() has set the shutdown trigger and waited for the server to stop.
    assert time.monotonic() - started < 1.5  # not graceful_timeout (3 s) later
    assert await asyncio.wait_for(reader.read(), 1) == b""
    writer.close()

"""HTTP/2 POSTs with a different Bearer token each (h2load sends one fixed header set).

A few TLS connections, a few concurrent streams on each: one request per token (logout), or
refresh chains, each stream sending the refresh token its last answer returned. It runs in
Python, so it costs more client CPU than h2load.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import uvloop
from drivers import H2_CLIENTS, H2_STREAMS, SLACK, Result, percentiles


@dataclass
class _Tally:
    """Shared between connections: tokens left, latencies and statuses seen."""

    tokens: deque[str]
    until: float | None = None  # refresh chains: the perf_counter time they stop at
    latencies: list[float] = field(default_factory=list)
    non2xx: int = 0
    errors: int = 0


class H2Client:
    """One HTTP/2 client connection whose reader resolves a future per stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Wrap an open TLS stream."""
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self.statuses: dict[int, int] = {}
        self.bodies: dict[int, bytearray] = {}

    async def open(self) -> None:
        """Send the connection preface."""
        self.h2.initiate_connection()
        await self.flush()

    async def flush(self) -> None:
        """Write whatever h2 has queued."""
        self.writer.write(self.h2.data_to_send())
        await self.writer.drain()

    async def request(self, method: str, authority: str, path: str, token: str) -> int:
        """Send one bodiless request with a Bearer token and wait for its status."""
        status, _ = await self.exchange(method, authority, path, token)
        return status

    async def exchange(
        self, method: str, authority: str, path: str, token: str
    ) -> tuple[int, bytes]:
        """Send one bodiless request with a Bearer token; its status and body."""
        stream = self.h2.get_next_available_stream_id()
        headers = [
            (":method", method),
            (":scheme", "https"),
            (":authority", authority),
            (":path", path),
            ("authorization", f"Bearer {token}"),
        ]
        if method == "POST":
            headers.append(("content-length", "0"))
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.pending[stream] = future
        self.h2.send_headers(stream, headers, end_stream=True)
        await self.flush()
        return await future

    async def read_loop(self) -> None:
        """Feed received bytes to h2 and settle finished streams."""
        while data := await self.reader.read(65536):
            for event in self.h2.receive_data(data):
                self._handle(event)
            await self.flush()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("connection closed"))

    def _handle(self, event: h2.events.Event) -> None:
        """Record statuses, return flow-control credit, settle ended streams."""
        if isinstance(event, h2.events.ResponseReceived):
            status = dict(event.headers).get(b":status", b"0")
            self.statuses[event.stream_id] = int(status)
        elif isinstance(event, h2.events.DataReceived):
            self.bodies.setdefault(event.stream_id, bytearray()).extend(event.data)
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
            future = self.pending.pop(event.stream_id, None)
            if future is not None and not future.done():
                status = self.statuses.pop(event.stream_id, 0)
                future.set_result((status, bytes(self.bodies.pop(event.stream_id, b""))))


async def _stream_worker(conn: H2Client, tally: _Tally, authority: str, path: str) -> None:
    """One stream at a time on conn: a token per request, or refresh chains until the end."""
    token: str | None = None
    while tally.until is None or time.perf_counter() < tally.until:
        if token is None:
            if not tally.tokens:
                return
            token = tally.tokens.popleft()
        started = time.perf_counter()
        try:
            status, body = await conn.exchange("POST", authority, path, token)
        except (ConnectionError, OSError):
            tally.errors += 1
            return
        tally.latencies.append((time.perf_counter() - started) * 1e3)
        if not 200 <= status < 300:
            tally.non2xx += 1
        token = _rotated(body) if tally.until is not None and status == 200 else None


def _rotated(body: bytes) -> str | None:
    """The refresh token a refresh answer returned."""
    token = json.loads(body).get("refresh_token")
    return token if isinstance(token, str) else None


async def _client(port: int, path: str, tally: _Tally, context: ssl.SSLContext) -> None:
    """One TLS connection (ALPN h2) with H2_STREAMS concurrent streams."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
    )
    alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
    if alpn != "h2":
        writer.close()
        raise ConnectionError(f"server chose {alpn!r}, not h2")
    conn = H2Client(reader, writer)
    await conn.open()
    reading = asyncio.create_task(conn.read_loop())
    authority = f"127.0.0.1:{port}"
    try:
        workers = [_stream_worker(conn, tally, authority, path) for _ in range(H2_STREAMS)]
        await asyncio.gather(*workers)
    finally:
        reading.cancel()
        writer.close()


async def _run(
    port: int, path: str, tokens: list[str], context: ssl.SSLContext, chain_s: float | None
) -> Result:
    """Spend every token (or run refresh chains for chain_s) over H2_CLIENTS connections."""
    started = time.perf_counter()
    tally = _Tally(deque(tokens), None if chain_s is None else started + chain_s)
    await asyncio.gather(*(_client(port, path, tally, context) for _ in range(H2_CLIENTS)))
    seconds = time.perf_counter() - started
    p50, p99 = percentiles(sorted(tally.latencies))
    return Result(len(tally.latencies), seconds, p50, p99, tally.non2xx, tally.errors)


def post_tokens(port: int, path: str, tokens: list[str], cert: Path, limit: float) -> Result:
    """POST path once per token over HTTP/2; bounded by limit seconds."""
    return uvloop.run(asyncio.wait_for(_run(port, path, tokens, _context(cert), None), limit))


def post_chains(port: int, path: str, seeds: list[str], cert: Path, seconds: float) -> Result:
    """Refresh chains over HTTP/2 for seconds, each stream starting from a seed token."""
    run = _run(port, path, seeds, _context(cert), seconds)
    return uvloop.run(asyncio.wait_for(run, seconds + SLACK))


def _context(cert: Path) -> ssl.SSLContext:
    """TLS client context trusting cert, offering h2 only."""
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(["h2"])
    return context

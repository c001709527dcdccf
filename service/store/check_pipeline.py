"""Revocation checks from the server's event loop, pipelined on one raw connection.

Commands queued during one loop iteration leave in one write, replies are parsed by
hiredis and matched in order: under load one round trip answers many requests, and the
loop never blocks on Redis. Commands arrive pre-encoded (the check of a given token never
changes but for the server's run_id), which skips redis-py's per-call encoding (~15 us).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar, cast

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def encode(*args: str | int | bytes) -> bytes:
    """RESP encoding of one command's arguments, without the array header."""
    parts = []
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def command(count: int, encoded: bytes) -> bytes:
    """A whole RESP command from its argument count and encoded arguments."""
    return b"*%d\r\n%s" % (count, encoded)


class _Replies(asyncio.Protocol):
    """Feeds hiredis and resolves the waiting futures (with their deadlines) in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.outbox: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.waiting.popleft()[0]
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiting:
            future = self.waiting.popleft()[0]
            if not future.done():
                future.set_exception(RedisConnectionError(f"connection lost: {exc!r}"))

    def overdue(self, now: float) -> bool:
        """Whether the oldest command has waited past its deadline."""
        return bool(self.waiting) and self.waiting[0][1] < now


class CheckPipeline:
    """One connection, owned by the loop that creates this pipeline."""

    def __init__(self, url: str, *, timeout: float, script: str) -> None:
        self._options: dict[str, Any] = dict(parse_url(url))
        self._timeout = timeout
        self._script = script
        self._loop = asyncio.get_running_loop()
        self._pid = os.getpid()
        self._protocol: _Replies | None = None
        self._connecting: asyncio.Future[_Replies] | None = None
        self.run_id = b""

    @property
    def usable(self) -> bool:
        """Whether this pipeline belongs to the running loop of this process."""
        return self._loop is asyncio.get_running_loop() and self._pid == os.getpid()

    async def call(self, build: Callable[[bytes], bytes]) -> Any:
        """Send build(run_id), a whole command, and await its reply; error replies raise.

        A reply overdue by the timeout drops the connection (see _watch), failing every
        command waiting on it: one timer per connection instead of one per call.
        """
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connected()
        reply = await self._send(protocol, build(self.run_id))
        if _is_noscript(reply):
            await self._send(protocol, self._load_script())
            reply = await self._send(protocol, build(self.run_id))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def _send(self, protocol: _Replies, data: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        if protocol.closed:  # lost while the caller waited: nothing would ever answer
            future.set_exception(RedisConnectionError("connection lost"))
            return future
        protocol.waiting.append((future, self._loop.time() + self._timeout))
        if not protocol.outbox:
            self._loop.call_soon(_flush, protocol)
        protocol.outbox.append(data)
        return future

    async def _connected(self) -> _Replies:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(
                asyncio.wait_for(self._connect(), self._timeout)
            )
        try:
            return await asyncio.shield(self._connecting)
        except TimeoutError as exc:
            raise RedisTimeoutError("connecting timed out") from exc
        except OSError as exc:
            raise RedisConnectionError(str(exc)) from exc
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    def _watch(self, protocol: _Replies) -> None:
        """Every half timeout: drop the connection if a reply is overdue."""
        if protocol.closed:
            return
        if protocol.overdue(self._loop.time()):
            self._drop(protocol)
            return
        self._loop.call_later(self._timeout / 2, self._watch, protocol)

    async def _connect(self) -> _Replies:
        protocol = await open_connection(self._loop, self._options, _Replies)
        try:
            for request in [*preamble(self._options), self._load_script()]:
                if isinstance(reply := await self._send(protocol, request), ResponseError):
                    raise reply
            info = await self._send(protocol, command(2, encode("INFO", "server")))
            self.run_id = parse_run_id(info).encode()
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.close()
            raise
        self._protocol = protocol
        self._loop.call_later(self._timeout / 2, self._watch, protocol)
        return protocol

    def _load_script(self) -> bytes:
        return command(3, encode("SCRIPT", "LOAD", self._script))

    def _drop(self, protocol: _Replies | None = None) -> None:
        protocol = protocol or self._protocol
        if protocol is self._protocol:
            self._protocol = None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            protocol.connection_lost(None)

    async def close(self) -> None:
        """Close the connection, from whichever loop calls (it is owned by its own)."""
        call_on_owner(self._loop, self._pid, self._drop)


def call_on_owner(loop: asyncio.AbstractEventLoop, pid: int, callback: Callable[[], Any]) -> None:
    """Run callback on the loop (of process pid) that owns a connection, from any loop."""
    if loop.is_closed() or pid != os.getpid():
        return
    if loop is asyncio.get_running_loop():
        callback()
    elif loop.is_running():
        loop.call_soon_threadsafe(callback)


P = TypeVar("P", bound=asyncio.Protocol)


async def open_connection(
    loop: asyncio.AbstractEventLoop, options: dict[str, Any], factory: Callable[[], P]
) -> P:
    """Connect to the Redis that parsed URL options name: TCP, TLS or a Unix socket."""
    connection_class = options.get("connection_class")
    if connection_class is UnixDomainSocketConnection:
        _, protocol = await loop.create_unix_connection(factory, options["path"])
    else:
        tls = _tls_context(options) if connection_class is SSLConnection else None
        _, protocol = await loop.create_connection(
            factory, options.get("host", "localhost"), options.get("port", 6379), ssl=tls
        )
    return protocol


def preamble(options: dict[str, Any], *, select: bool = True) -> list[bytes]:
    """AUTH and SELECT, as the URL asks."""
    requests = []
    if options.get("password"):
        if options.get("username"):
            requests.append(command(3, encode("AUTH", options["username"], options["password"])))
        else:
            requests.append(command(2, encode("AUTH", options["password"])))
    if select and options.get("db"):
        requests.append(command(2, encode("SELECT", options["db"])))
    return requests


def _flush(protocol: _Replies) -> None:
    """Write everything queued during this loop iteration at once."""
    data, protocol.outbox = b"".join(protocol.outbox), []
    if protocol.transport is not None and not protocol.closed:
        protocol.transport.write(data)


def _is_noscript(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")


def parse_run_id(info: object) -> str:
    """The run_id field of an INFO server reply, raw or parsed."""
    if isinstance(info, dict):
        return str(info.get("run_id", ""))
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.removeprefix("run_id:").strip()
    return ""


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if str(options.get("ssl_cert_reqs", "required")).lower() in {"none", "cert_none"}:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context

"""The blocklist's check on redis-py: verdicts, timeouts, reconnection and the script."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import hiredis
import pytest
import redis

from service.config import Settings
from service.store.blocklist import (
    BREAKER_SECONDS,
    CHECK_SCRIPT,
    BlocklistUnavailable,
    Entry,
    Kind,
    RedisBlocklist,
    TokenRef,
    Verdict,
    session_started_ms,
)
from tests.blocklist_helpers import (
    TIMEOUT,
    RecordUnreadable,
    durable,
    failing_midway,
    make_blocklist,
    new_ref,
)
from tests.proxy import TcpProxy
from tests.servers import SnapshottingRedis

CHECK_SHA = hashlib.sha1(CHECK_SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis's script id


@pytest.fixture
async def blocklist(settings: Settings, prefix: str) -> AsyncIterator[RedisBlocklist]:
    """A loaded, empty blocklist under that prefix."""
    loaded = make_blocklist(str(settings.redis_url), prefix)
    assert await loaded.rebuild(durable())
    yield loaded
    await loaded.close()


async def test_concurrent_checks_get_their_own_verdicts(blocklist: RedisBlocklist) -> None:
    now = int(time.time())
    expected: dict[TokenRef, Verdict] = {}
    entries: list[Entry] = []
    for index in range(60):
        ref = new_ref(now)
        started = session_started_ms(ref)
        revocation = [
            None,
            Entry(Kind.TOKEN, ref.jti, ref.exp),
            Entry(Kind.SESSION, ref.sid, ref.sxp),
            Entry(Kind.USER, ref.sub, ref.sxp, cutoff_ms=started),
            Entry(Kind.USER, ref.sub, ref.sxp, cutoff_ms=started - 1),  # an older session's
        ][index % 5]
        if revocation is not None:
            entries.append(revocation)
        expected[ref] = Verdict.REVOKED if index % 5 in (1, 2, 3) else Verdict.VALID
    await blocklist.add(entries)
    refs = list(expected)
    for _ in range(2):  # first on a new connection, then on the one it left open
        verdicts = await asyncio.gather(*(blocklist.check(ref) for ref in refs))
        assert verdicts == [expected[ref] for ref in refs]


async def test_a_blocklist_not_loaded_says_so(settings: Settings, prefix: str) -> None:
    unloaded = make_blocklist(str(settings.redis_url), prefix)
    try:
        assert await unloaded.check(new_ref()) is Verdict.NOT_LOADED
    finally:
        await unloaded.close()


async def test_a_closed_port_fails_fast() -> None:
    unreachable = make_blocklist("redis://127.0.0.1:1/0", "nowhere:")
    started = time.monotonic()
    try:
        results = await asyncio.gather(
            *(unreachable.check(new_ref()) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(result, BlocklistUnavailable) for result in results), results
        with pytest.raises(BlocklistUnavailable, match="moments ago"):
            await unreachable.check(new_ref())
    finally:
        await unreachable.close()
    assert time.monotonic() - started < TIMEOUT


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose connections the kernel accepts, and that nothing ever answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])


async def test_a_silent_redis_fails_after_the_timeout(silent_port: int) -> None:
    silent = make_blocklist(f"redis://127.0.0.1:{silent_port}/0", "silent:")
    started = time.monotonic()
    try:
        results = await asyncio.gather(
            *(silent.check(new_ref()) for _ in range(5)), return_exceptions=True
        )
    finally:
        await silent.close()
    assert all(isinstance(result, BlocklistUnavailable) for result in results), results
    assert time.monotonic() - started < TIMEOUT + 0.5


@pytest.mark.usefixtures("blocklist")
async def test_the_pipeline_reconnects_after_losing_redis(settings: Settings, prefix: str) -> None:
    upstream = urlsplit(str(settings.redis_url))
    proxy = TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 6379)
    proxy.start()
    proxied = make_blocklist(f"redis://127.0.0.1:{proxy.port}{upstream.path or '/0'}", prefix)
    try:
        ref = new_ref()
        assert await proxied.check(ref) is Verdict.VALID
        proxy.stop()
        with pytest.raises(BlocklistUnavailable):
            await proxied.check(ref)
        proxy.start()
        await asyncio.sleep(BREAKER_SECONDS)
        assert await proxied.check(ref) is Verdict.VALID
    finally:
        await proxied.close()
        proxy.close()


class StallsFirstConnection:
    """A proxy to Redis that accepts its first connection and never answers on it."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        # Each connection's transport is gone before the test ends (no ResourceWarning later).
        await asyncio.gather(*(w.wait_closed() for w in self._writers), return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        if self.connections == 1:
            await reader.read()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers.append(up_writer)
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction of a connection until it ends."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.mark.usefixtures("blocklist")
async def test_a_stalled_connection_attempt_is_given_up(settings: Settings, prefix: str) -> None:
    async with StallsFirstConnection(str(settings.redis_url)) as url:
        stalled = make_blocklist(url, prefix)
        try:
            with pytest.raises(BlocklistUnavailable):
                await stalled.check(new_ref())
            await asyncio.sleep(BREAKER_SECONDS)
            # Redis answers new connections again: a check must not wait on the stalled one.
            assert await stalled.check(new_ref()) is Verdict.VALID
        finally:
            await stalled.close()


class ClosesAfterHandshake:
    """A fake Redis that answers a connection's INFO and SCRIPT LOAD, then hangs up."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests = hiredis.Reader()
        answered = 0
        while answered < 2 and (data := await reader.read(65536)):
            requests.feed(data)
            while (request := requests.gets()) is not False:
                answered += 1
                info = request[0].upper() == b"INFO"
                writer.write(_bulk(b"run_id:fake\r\n" if info else CHECK_SHA.encode()))
        await writer.drain()
        writer.close()


def _bulk(data: bytes) -> bytes:
    """A RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


async def test_a_connection_lost_right_after_the_handshake_fails_the_check() -> None:
    async with ClosesAfterHandshake() as url:
        hung_up = make_blocklist(url, "hung-up:")
        try:
            async with asyncio.timeout(TIMEOUT * 5):
                with pytest.raises(BlocklistUnavailable):
                    await hung_up.check(new_ref())
        finally:
            await hung_up.close()


async def test_a_flushed_script_is_loaded_again(snapshotting_redis: SnapshottingRedis) -> None:
    own = make_blocklist(snapshotting_redis.url, "noscript:")
    direct = redis.Redis.from_url(snapshotting_redis.url)
    try:
        revoked, valid = new_ref(), new_ref()
        assert await own.rebuild(durable(Entry(Kind.TOKEN, revoked.jti, revoked.exp)))
        assert await own.check(valid) is Verdict.VALID
        direct.script_flush()
        verdicts = await asyncio.gather(*(own.check(ref) for ref in [revoked, valid] * 5))
        assert verdicts == [Verdict.REVOKED, Verdict.VALID] * 5
        assert direct.script_exists(CHECK_SHA) == [True]
        assert await own.check(valid) is Verdict.VALID
        direct.script_flush()
        assert await own.check(revoked) is Verdict.REVOKED
    finally:
        direct.close()
        await own.close()


async def test_a_load_that_fails_gives_its_lock_back(settings: Settings, prefix: str) -> None:
    """The next recovery loads at once, rather than after REBUILD_LOCK_SECONDS."""
    blocklist = make_blocklist(str(settings.redis_url), prefix)
    try:
        revoked = new_ref()
        with pytest.raises(RecordUnreadable):
            await blocklist.rebuild(failing_midway(Entry(Kind.TOKEN, revoked.jti, revoked.exp)))
        assert not (await blocklist.state()).loaded
        assert await blocklist.rebuild(durable(Entry(Kind.TOKEN, revoked.jti, revoked.exp)))
        assert await blocklist.check(revoked) is Verdict.REVOKED
    finally:
        await blocklist.close()

"""The revocation check awaited before Flask runs: its answer, and the pipeline that gets it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import hiredis
import pytest
import redis
from flask import Flask
from redis.exceptions import ResponseError

from service.auth.prefetch import ENVIRON_KEY, prefetched, revocation_prefetch
from service.auth.verified import Verified, VerifiedTokens
from service.config import Settings
from service.ids import new_id
from service.store.blocklist import (
    BREAKER_SECONDS,
    CHECK_SCRIPT,
    CHECK_SHA,
    ENCODED_BYTES,
    BlocklistUnavailable,
    Entry,
    Kind,
    RedisBlocklist,
    TokenRef,
    Verdict,
    session_started_ms,
)
from service.store.check_pipeline import CheckPipeline, command, encode
from tests.blocklist_helpers import TIMEOUT, claims_of, durable, make_blocklist, new_ref
from tests.proxy import TcpProxy
from tests.servers import SnapshottingRedis


def sends(data: bytes) -> Callable[[bytes], bytes]:
    """A pipeline command that ignores the run_id."""
    return lambda _run_id: data


def test_an_answer_is_used_for_exactly_the_same_token() -> None:
    ref = new_ref()
    environ: dict[str, Any] = {ENVIRON_KEY: (ref, Verdict.REVOKED)}
    assert prefetched(environ, TokenRef.from_claims(claims_of(ref))) is Verdict.REVOKED
    others = [
        TokenRef.from_claims({**claims_of(ref), name: value})
        for name, value in [
            ("jti", new_id()),
            ("exp", ref.exp + 1),
            ("sid", new_id()),
            ("sxp", ref.sxp + 1),
            ("sub", new_id()),
        ]
    ]
    assert [prefetched(environ, other) for other in others] == [None] * len(others)


def test_no_answer_means_ask_now() -> None:
    assert prefetched({}, new_ref()) is None


def test_an_unavailable_blocklist_is_raised_for_that_token_only() -> None:
    ref = new_ref()
    down = BlocklistUnavailable("blocklist unreachable: TimeoutError")
    environ: dict[str, Any] = {ENVIRON_KEY: (ref, down)}
    with pytest.raises(BlocklistUnavailable) as raised:
        prefetched(environ, ref)
    assert raised.value is down
    assert prefetched(environ, new_ref()) is None


class FakeStore:
    """A store whose revocation check gives one answer and records what it was asked."""

    def __init__(self, answer: Verdict | BlocklistUnavailable) -> None:
        self.answer = answer
        self.asked: list[TokenRef] = []

    async def check_async(self, ref: TokenRef) -> Verdict:
        """The answer, or the unavailability raised."""
        self.asked.append(ref)
        if isinstance(self.answer, BlocklistUnavailable):
            raise self.answer
        return self.answer


def app_with(store: FakeStore, memo: VerifiedTokens | None, revocation_check: bool = True) -> Flask:
    """A bare Flask app with what the prefetch hook reads."""
    app = Flask(__name__)
    app.config["REVOCATION_CHECK"] = revocation_check
    app.extensions["store"] = store
    if memo is not None:
        app.extensions["verified_tokens"] = memo
    return app


def memo_holding(token: str, ref: TokenRef) -> VerifiedTokens:
    """A memo that verified token, whose claims are those of ref."""
    memo = VerifiedTokens(8)
    memo.remember(token, Verified({"alg": "HS256"}, claims_of(ref), b"k" * 32, float(ref.exp)))
    return memo


@pytest.mark.parametrize("answer", [Verdict.VALID, Verdict.REVOKED, Verdict.NOT_LOADED])
async def test_a_memoised_token_is_asked_about_before_the_view(answer: Verdict) -> None:
    ref = new_ref()
    store = FakeStore(answer)
    prefetch = revocation_prefetch(app_with(store, memo_holding("a.b.c", ref)))
    assert prefetch is not None
    environ: dict[str, Any] = {"HTTP_AUTHORIZATION": "Bearer a.b.c"}
    await prefetch(environ)
    assert store.asked == [ref]
    assert environ[ENVIRON_KEY] == (ref, answer)
    assert prefetched(environ, ref) is answer


async def test_an_unreachable_blocklist_becomes_the_answer() -> None:
    ref = new_ref()
    down = BlocklistUnavailable("blocklist unreachable: ConnectionError")
    prefetch = revocation_prefetch(app_with(FakeStore(down), memo_holding("a.b.c", ref)))
    assert prefetch is not None
    environ: dict[str, Any] = {"HTTP_AUTHORIZATION": "Bearer a.b.c"}
    await prefetch(environ)
    with pytest.raises(BlocklistUnavailable) as raised:
        prefetched(environ, ref)
    assert raised.value is down


@pytest.mark.parametrize(
    "authorization", [None, "Basic dXNlcjpwYXNz", "Bearer x.y.z", "bearer a.b.c", "Bearer"]
)
async def test_only_memoised_bearer_tokens_are_asked_about(authorization: str | None) -> None:
    store = FakeStore(Verdict.VALID)
    prefetch = revocation_prefetch(app_with(store, memo_holding("a.b.c", new_ref())))
    assert prefetch is not None
    environ: dict[str, Any] = {}
    if authorization is not None:
        environ["HTTP_AUTHORIZATION"] = authorization
    await prefetch(environ)
    assert store.asked == []
    assert ENVIRON_KEY not in environ


def test_no_hook_without_a_memo_or_revocation_checks() -> None:
    store = FakeStore(Verdict.VALID)
    assert revocation_prefetch(app_with(store, None)) is None
    assert revocation_prefetch(app_with(store, VerifiedTokens(8), revocation_check=False)) is None


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
        verdicts = await asyncio.gather(*(blocklist.check_async(ref) for ref in refs))
        assert verdicts == [expected[ref] for ref in refs]
    assert [blocklist.check(ref) for ref in refs] == verdicts


async def test_a_blocklist_not_loaded_says_so(settings: Settings, prefix: str) -> None:
    unloaded = make_blocklist(str(settings.redis_url), prefix)
    try:
        assert await unloaded.check_async(new_ref()) is Verdict.NOT_LOADED
    finally:
        await unloaded.close()


async def test_an_error_reply_leaves_the_pipeline_in_step(settings: Settings) -> None:
    pipeline = CheckPipeline(str(settings.redis_url), timeout=TIMEOUT, script=CHECK_SCRIPT)
    bad = command(2, encode("NO-SUCH-COMMAND", "x"))
    echo = [command(2, encode("ECHO", f"reply {index}")) for index in range(4)]
    try:
        replies = await asyncio.gather(
            *(pipeline.call(sends(data)) for data in [bad, *echo, bad]),
            return_exceptions=True,
        )
    finally:
        await pipeline.close()
    assert isinstance(replies[0], ResponseError)
    assert replies[1:5] == [f"reply {index}".encode() for index in range(4)]
    assert isinstance(replies[5], ResponseError)


async def test_a_closed_port_fails_fast() -> None:
    unreachable = make_blocklist("redis://127.0.0.1:1/0", "nowhere:")
    started = time.monotonic()
    try:
        results = await asyncio.gather(
            *(unreachable.check_async(new_ref()) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(result, BlocklistUnavailable) for result in results), results
        with pytest.raises(BlocklistUnavailable, match="moments ago"):
            await unreachable.check_async(new_ref())
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
            *(silent.check_async(new_ref()) for _ in range(5)), return_exceptions=True
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
        assert await proxied.check_async(ref) is Verdict.VALID
        proxy.stop()
        with pytest.raises(BlocklistUnavailable):
            await proxied.check_async(ref)
        proxy.start()
        await asyncio.sleep(BREAKER_SECONDS)
        assert await proxied.check_async(ref) is Verdict.VALID
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
                await stalled.check_async(new_ref())
            await asyncio.sleep(BREAKER_SECONDS)
            # Redis answers new connections again: a check must not wait on the stalled one.
            assert await stalled.check_async(new_ref()) is Verdict.VALID
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
                    await hung_up.check_async(new_ref())
        finally:
            await hung_up.close()


async def test_a_flushed_script_is_loaded_again(snapshotting_redis: SnapshottingRedis) -> None:
    own = make_blocklist(snapshotting_redis.url, "noscript:")
    direct = redis.Redis.from_url(snapshotting_redis.url)
    try:
        revoked, valid = new_ref(), new_ref()
        assert await own.rebuild(durable(Entry(Kind.TOKEN, revoked.jti, revoked.exp)))
        assert await own.check_async(valid) is Verdict.VALID
        direct.script_flush()
        verdicts = await asyncio.gather(*(own.check_async(ref) for ref in [revoked, valid] * 5))
        assert verdicts == [Verdict.REVOKED, Verdict.VALID] * 5
        assert direct.script_exists(CHECK_SHA) == [True]
        assert own.check(valid) is Verdict.VALID
        direct.script_flush()
        assert own.check(revoked) is Verdict.REVOKED
    finally:
        direct.close()
        await own.close()


def test_encoded_checks_stay_within_their_byte_budget() -> None:
    blocklist = make_blocklist("redis://127.0.0.1:1/0", "budget:")
    now = int(time.time())
    for index in range(2000):
        long_id = f"{index:08d}" + "x" * 4000  # ids as large as a client could make them
        blocklist._encoded_check(TokenRef(long_id, now, long_id, now, long_id))
        assert blocklist._encoded_bytes <= ENCODED_BYTES
    assert 0 < len(blocklist._encoded) < 2000

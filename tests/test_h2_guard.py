"""HTTP/2 abuse meets GOAWAY ENHANCE_YOUR_CALM and a penalty; a stream too many is refused alone.

Attackers connect from addresses of their own (127.0.0.2 and up; all of 127/8 reaches the
server), bystanders from 127.0.0.1: an address cut off is refused new connections a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import DenialOfServiceError
from hypercorn.protocol.h2 import H2Protocol
from hyperframe.frame import (
    DataFrame,
    Frame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from service.config import Settings
from service.transport import h2_budgets, h2_guard
from tests.h2_raw import RawH2, serving
from tests.servers import RunningServer, server_env, start_server

FLOOD_FRAMES = 20_000
CLOSE_WITHIN = 10.0  # seconds from the first frame of a flood to the end of its connection
ATTACKERS = (f"127.0.0.{number}" for number in range(10, 255))  # one address per attack
PENALTY = 2.0  # seconds, for a first offence, on the penalty test's server


@pytest.fixture(scope="module")
def server(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The service with one worker: attackers and bystanders share it."""
    directory = tmp_path_factory.mktemp("h2-guard")
    running = start_server(server_env(settings, directory), workers=1, log_dir=directory)
    try:
        yield running
    finally:
        running.stop()


def request(path: bytes = b"/healthz") -> list[tuple[bytes, bytes]]:
    """A GET's header list."""
    return [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"127.0.0.1"),
        (b":path", path),
    ]


@contextlib.asynccontextmanager
async def bystander(server: RunningServer) -> AsyncIterator[list[int]]:
    """A well-behaved HTTP/2 client on its own connection, asking all along; its statuses."""
    statuses: list[int] = []
    stop = asyncio.Event()

    async def ask() -> None:
        async with httpx.AsyncClient(
            base_url=server.url, verify=False, http1=False, http2=True, timeout=10
        ) as http:
            while not stop.is_set() or not statuses:
                statuses.append((await http.get("/healthz")).status_code)

    asking = asyncio.create_task(ask())
    try:
        yield statuses
    finally:
        stop.set()
        await asking


async def flood(connection: RawH2, frames: Iterator[bytes], batch: int = 500) -> int:
    """Write frames until they run out or the server ends the connection; how many."""
    sent = 0
    while not connection.goaway.done():
        chunk = list(itertools.islice(frames, batch))
        if not chunk or not await connection.send(b"".join(chunk)):
            break
        sent += len(chunk)
        await asyncio.sleep(0)  # a client that also reads what the server says
    return sent


def repeated(frame: Frame) -> Iterator[bytes]:
    """The same frame, FLOOD_FRAMES times."""
    data = frame.serialize()
    return (data for _ in range(FLOOD_FRAMES))


def priorities() -> Iterator[bytes]:
    """PRIORITY frames for idle streams, each a new one (they used to fill the priority tree)."""
    for stream_id in range(1001, 1001 + 2 * FLOOD_FRAMES, 2):
        frame = PriorityFrame(stream_id)
        frame.depends_on, frame.stream_weight = stream_id + 2, 16
        yield frame.serialize()


def window_updates() -> Iterator[bytes]:
    """One-byte connection WINDOW_UPDATEs."""
    frame = WindowUpdateFrame(0)
    frame.window_increment = 1
    return repeated(frame)


def pings() -> Iterator[bytes]:
    """PINGs."""
    frame = PingFrame(0)
    frame.opaque_data = b"12345678"
    return repeated(frame)


FLOODS = {
    "PING": pings,
    "SETTINGS": lambda: repeated(SettingsFrame(0)),
    "PRIORITY": priorities,
    "WINDOW_UPDATE": window_updates,
    "empty DATA": lambda: repeated(DataFrame(1)),  # on the open stream 1
}


async def goaway_and_close(connection: RawH2, started: float) -> int:
    """The GOAWAY error code, once the server has also closed the connection in time."""
    left = CLOSE_WITHIN - (time.monotonic() - started)
    code = await asyncio.wait_for(asyncio.shield(connection.goaway), left)
    await asyncio.wait_for(connection.closed.wait(), CLOSE_WITHIN - (time.monotonic() - started))
    return code


@pytest.mark.fault
@pytest.mark.parametrize("kind", FLOODS)
async def test_a_frame_flood_gets_goaway_enhance_your_calm(
    server: RunningServer, kind: str
) -> None:
    async with bystander(server) as statuses:
        attacker = await RawH2.open(server.url, source=next(ATTACKERS))
        try:
            _, frames = attacker.headers(request(), end_stream=False)
            await attacker.send(frames)  # stream 1 stays open
            started = time.monotonic()
            sent = await flood(attacker, FLOODS[kind]())
            code = await goaway_and_close(attacker, started)
        finally:
            await attacker.close()
    assert code == ErrorCodes.ENHANCE_YOUR_CALM, f"GOAWAY {code!r} after {sent} frames"
    assert statuses and set(statuses) == {200}
    log = server.log()
    assert "Traceback" not in log, log
    assert (
        f"sent too many {kind} frames: GOAWAY ENHANCE_YOUR_CALM, connection closed; "
        "its new connections refused for 1.0 s" in log
    )


def reset(stream_id: int) -> bytes:
    """A client's RST_STREAM (CANCEL)."""
    frame = RstStreamFrame(stream_id)
    frame.error_code = ErrorCodes.CANCEL
    return frame.serialize()


def rapid_resets(connection: RawH2) -> Iterator[bytes]:
    """A new stream, reset at once, again and again (CVE-2023-44487)."""
    for _ in range(FLOOD_FRAMES):
        stream_id, headers = connection.headers(request())
        yield headers + reset(stream_id)


@pytest.mark.fault
async def test_rapid_reset_gets_goaway_enhance_your_calm_without_a_traceback(
    server: RunningServer,
) -> None:
    async with bystander(server) as statuses:
        attacker = await RawH2.open(server.url, source=next(ATTACKERS))
        try:
            started = time.monotonic()
            sent = await flood(attacker, rapid_resets(attacker), batch=100)
            code = await goaway_and_close(attacker, started)
        finally:
            await attacker.close()
    assert code == ErrorCodes.ENHANCE_YOUR_CALM, f"GOAWAY {code!r} after {sent} streams"
    assert statuses and set(statuses) == {200}
    log = server.log()
    assert "Traceback" not in log and "TooManyStreamsError" not in log, log
    assert "sent too many RST_STREAM frames: GOAWAY ENHANCE_YOUR_CALM" in log


@pytest.fixture(scope="module")
def penalising_server(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """The service with one worker, whose first penalty is PENALTY seconds."""
    directory = tmp_path_factory.mktemp("h2-penalty")
    env = server_env(settings, directory) | {"H2_ABUSE_PENALTY": str(PENALTY)}
    running = start_server(env, workers=1, log_dir=directory)
    try:
        yield running
    finally:
        running.stop()


async def attempt(server: RunningServer, source: str) -> str:
    """A new connection from source and one request on it: "200", or how it was refused."""
    try:
        connection = await asyncio.wait_for(RawH2.open(server.url, source=source), 5)
    except (ConnectionError, ssl.SSLError) as exc:
        return f"refused ({type(exc).__name__})"
    try:
        return await connection.request(request())
    finally:
        await connection.close()


@pytest.mark.fault
async def test_an_address_cut_off_for_abuse_is_refused_at_accept_until_its_penalty_ends(
    penalising_server: RunningServer,
) -> None:
    server = penalising_server
    attacker_address = "127.0.0.2"
    async with bystander(server) as statuses:
        attacker = await RawH2.open(server.url, source=attacker_address)
        try:
            await flood(attacker, pings())
            code = await asyncio.wait_for(asyncio.shield(attacker.goaway), CLOSE_WITHIN)
        finally:
            await attacker.close()
        cut = time.monotonic()  # the penalty began before the GOAWAY left the server
        assert code == ErrorCodes.ENHANCE_YOUR_CALM
        # (when the attempt began, whom from, how long it took, its outcome)
        attempts: list[tuple[float, str, float, str]] = []
        while time.monotonic() - cut < PENALTY + 5.0:
            for source in (attacker_address, "127.0.0.1"):
                began = time.monotonic()
                outcome = await attempt(server, source)
                attempts.append((began - cut, source, time.monotonic() - began, outcome))
            if attempts[-2][3] == "200":
                break
            await asyncio.sleep(0.05)
    attacker_attempts = [each for each in attempts if each[1] == attacker_address]
    during = [each for each in attacker_attempts if each[0] < PENALTY - 0.25]
    assert len(during) >= 3, attempts  # the penalty was seen, not slept through
    assert all(outcome.startswith("refused") for *_, outcome in during), attempts
    assert all(took < 0.5 for _, _, took, _ in during), attempts  # refused at once
    assert attacker_attempts[-1][3] == "200", attempts  # served again once it ended
    assert attacker_attempts[-1][0] < PENALTY + 5.0, attempts
    # Others were served all along: the bystander's connection, and new ones.
    assert all(outcome == "200" for _, source, _, outcome in attempts if source == "127.0.0.1")
    assert statuses and set(statuses) == {200}
    log = server.log()
    assert "Traceback" not in log, log
    assert (
        f"HTTP/2 client {attacker_address} sent too many PING frames: GOAWAY ENHANCE_YOUR_CALM, "
        f"connection closed; its new connections refused for {PENALTY:.1f} s" in log
    )
    assert f"new connection from {attacker_address} refused at accept" in log


@pytest.mark.fault
async def test_a_stream_past_the_limit_is_refused_and_the_others_complete(
    server: RunningServer,
) -> None:
    connection = await RawH2.open(server.url)
    try:
        await connection.request(request())  # the server's SETTINGS have arrived
        limit = connection.max_concurrent_streams
        assert limit is not None
        held = [connection.headers(request(), end_stream=False) for _ in range(limit)]
        extra, frames = connection.headers(request(), end_stream=False)
        await connection.send(b"".join(frames for _, frames in held) + frames)
        assert await connection.outcome(extra) == f"reset {ErrorCodes.REFUSED_STREAM}"
        ends = [DataFrame(stream_id, flags=["END_STREAM"]) for stream_id, _ in held]
        await connection.send(b"".join(end.serialize() for end in ends))
        outcomes = [await connection.outcome(stream_id) for stream_id, _ in held]
        assert outcomes == ["200"] * limit
        assert await connection.request(request()) == "200"  # and the connection goes on
        assert not connection.goaway.done()
    finally:
        await connection.close()
    assert "Traceback" not in server.log()


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll condition until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


class App:
    """An ASGI app that counts the requests it started; /slow waits until released."""

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.started += 1
        if scope["path"] == "/slow":
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def test_streams_reset_while_their_application_runs_still_count_as_open() -> None:
    h2_guard.install()
    app = App()
    async with serving(app, h2_max_concurrent_streams=4) as url:
        connection = await RawH2.open(url)
        try:
            slow = [connection.headers(request(b"/slow")) for _ in range(4)]
            await connection.send(b"".join(frames for _, frames in slow))
            await wait_until(lambda: app.started == 4)
            extra, frames = connection.headers(request(b"/fast"))
            await connection.send(b"".join(reset(stream_id) for stream_id, _ in slow) + frames)
            assert await connection.outcome(extra) == f"reset {ErrorCodes.REFUSED_STREAM}"
            app.release.set()
            await wait_until(lambda: app.started == 4 and not connection.goaway.done())
            outcome = await connection.request(request(b"/fast"))
            while outcome != "200":  # the released applications may still be returning
                assert outcome == f"reset {ErrorCodes.REFUSED_STREAM}"
                outcome = await connection.request(request(b"/fast"))
        finally:
            await connection.close()


async def test_a_stream_reset_in_the_read_that_opened_it_never_starts_and_costs_more() -> None:
    h2_guard.install()
    app = App()
    async with serving(app) as url:
        connection = await RawH2.open(url)
        try:
            assert await connection.request(request()) == "200"
            pairs = [connection.headers(request()) for _ in range(20)]
            await connection.send(b"".join(frames + reset(sid) for sid, frames in pairs))
            assert await connection.request(request()) == "200"
            assert app.started == 2
            # 30 such resets spend the budget of 100 plain ones (these cost 4 each).
            more = [connection.headers(request()) for _ in range(10)]
            await connection.send(b"".join(frames + reset(sid) for sid, frames in more))
            assert await asyncio.wait_for(connection.goaway, 5) == ErrorCodes.ENHANCE_YOUR_CALM
        finally:
            await connection.close()
    assert app.started == 2


async def test_data_after_the_response_leaves_the_connection_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h2_guard.install()
    async with serving(App()) as url:
        connection = await RawH2.open(url)
        try:
            early, frames = connection.headers(request(), end_stream=False)
            await connection.send(frames)
            assert await connection.outcome(early) == "200"  # answered before the body ended
            body = DataFrame(early, flags=["END_STREAM"])
            body.data = b"late"
            await connection.send(body.serialize())
            assert await connection.request(request()) == "200"
        finally:
            await connection.close()
    assert "Traceback" not in caplog.text and "KeyError" not in caplog.text


async def test_priorities_naming_phantom_streams_grow_nothing() -> None:
    h2_guard.install()
    async with serving(App(), keep_alive_max_requests=10_000) as url:
        connection = await RawH2.open(url)
        try:
            for phantom in range(1_000_001, 1_002_103, 2):  # beyond the tree's 1,000 streams
                stream_id, frames = connection.headers(request(), depends_on=phantom)
                await connection.send(frames)
                assert await connection.outcome(stream_id) == "200"
        finally:
            await connection.close()


async def test_large_reads_are_handled_whole_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    h2_guard.install()
    handed: list[int] = []
    original = h2_guard._original["handle"]

    async def counting(self: Any, event: Any) -> None:
        handed.append(len(getattr(event, "data", b"")))
        await original(self, event)

    monkeypatch.setitem(h2_guard._original, "handle", counting)

    async def echo_length(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d" % size})

    body = bytes(range(256)) * 1200  # 300 KiB: many reads, each many slices
    async with serving(echo_length) as url, httpx.AsyncClient(http1=False, http2=True) as http:
        replies = await asyncio.gather(*(http.post(url, content=body) for _ in range(4)))
    assert [reply.content for reply in replies] == [b"%d" % len(body)] * 4
    assert {reply.http_version for reply in replies} == {"HTTP/2"}
    assert max(handed) == h2_guard.READ_SLICE  # h2 never got more at once


def test_streams_opened_earn_frames_that_go_with_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(h2_budgets.time, "monotonic", lambda: 1000.0)
    guard = h2_budgets.ConnectionGuard(("192.0.2.1", 4711))
    update = h2_budgets.FRAME_KINDS[WindowUpdateFrame]
    streams = 50
    for _ in range(streams):
        guard.credit()
    allowed = int(h2_budgets.BUDGETS["empty"].burst) + streams * h2_budgets.STREAM_CREDIT["empty"]
    for _ in range(allowed):
        guard.spend(update)
    with pytest.raises(DenialOfServiceError):
        guard.spend(update)
    assert guard.breach == "WINDOW_UPDATE"


def test_a_budget_refills_at_its_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(h2_budgets.time, "monotonic", lambda: now[0])
    guard = h2_budgets.ConnectionGuard(("192.0.2.1", 4711))
    ping = h2_budgets.FRAME_KINDS[PingFrame]
    budget = h2_budgets.BUDGETS["PING"]
    for _ in range(int(budget.burst)):
        guard.spend(ping)
    with pytest.raises(DenialOfServiceError):
        guard.spend(ping)
    now[0] += 2.5 / budget.per_second  # two frames' worth (and the one refused is owed)
    guard.spend(ping)
    with pytest.raises(DenialOfServiceError):
        guard.spend(ping)
    assert guard.breach == "PING"


def test_other_library_shapes_leave_the_libraries_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name, original in [
        ("_handle_events", h2_guard._original["handle_events"]),
        ("_create_stream", h2_guard._original["create_stream"]),
        ("__init__", h2_guard._original["protocol_init"]),
    ]:
        monkeypatch.setattr(H2Protocol, name, original)
    receive_frame = h2_guard._original["receive_frame"]
    monkeypatch.setattr(H2Connection, "_receive_frame", receive_frame)
    shapes = [
        dataclasses.replace(shape, names={"gone"}) if shape.name == "receive_frame" else shape
        for shape in h2_guard.SHAPES
    ]
    monkeypatch.setattr(h2_guard, "SHAPES", shapes)
    with caplog.at_level("WARNING", logger=h2_guard.__name__):
        h2_guard.install()
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert "receive_frame: uses ['gone']" in caplog.text
    assert H2Connection._receive_frame is receive_frame
    assert H2Protocol._handle_events is h2_guard._original["handle_events"]

"""The penalty box and the accept gate: penalised addresses are reset before TLS, for a while."""

from __future__ import annotations

import asyncio
import socket
import ssl
import tracemalloc
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypercorn.asyncio import run as hypercorn_run

from service.config import ConfigError, load_settings
from service.server import penalty_policy
from service.tls import ensure_dev_certificate
from service.transport import accept_gate, penalty_box
from service.transport.penalty_box import ENTRY_BYTES, PenaltyBox, Policy

POLICY = Policy(first=1.0, cap=8.0, addresses=100)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The box's monotonic clock, set by the test."""
    now = [1000.0]
    monkeypatch.setattr(penalty_box.time, "monotonic", lambda: now[0])
    return now


def box(policy: Policy | None = POLICY) -> PenaltyBox:
    """A box configured with policy."""
    made = PenaltyBox()
    made.configure(policy)
    return made


def test_each_offence_doubles_the_penalty_up_to_the_cap(clock: list[float]) -> None:
    penalties = []
    offender = box()
    for _ in range(6):
        penalties.append(offender.penalise(("192.0.2.7", 443)))
        assert not offender.admits(("192.0.2.7", 50000))
        clock[0] += penalties[-1] or 0.0  # it comes back as soon as it may
        assert offender.admits(("192.0.2.7", 50001))
    assert penalties == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_a_trusted_proxy_is_never_penalised(clock: list[float]) -> None:
    proxies = Policy(first=1.0, cap=8.0, addresses=100, exempt=(ip_network("10.0.0.0/8"),))
    gate = box(proxies)
    assert gate.penalise(("10.1.2.3", 443)) is None
    assert gate.admits(("10.1.2.3", 50000))
    assert gate.penalise(("192.0.2.7", 443)) == 1.0
    assert not gate.admits(("192.0.2.7", 50000))


def test_time_without_offence_forgives_a_doubling_per_cap(clock: list[float]) -> None:
    offender = box()
    for _ in range(4):
        clock[0] += offender.penalise(("192.0.2.7", 443)) or 0.0
    clock[0] += 2 * POLICY.cap  # two doublings forgiven of four
    assert offender.penalise(("192.0.2.7", 443)) == 4.0
    clock[0] += 4.0 + 10 * POLICY.cap
    assert offender.penalise(("192.0.2.7", 443)) == 1.0


def test_a_connection_cut_during_the_penalty_adds_nothing(clock: list[float]) -> None:
    offender = box()
    assert offender.penalise(("192.0.2.7", 1)) == 1.0
    clock[0] += 0.25
    assert offender.penalise(("192.0.2.7", 2)) == 0.75  # opened before the penalty
    clock[0] += 0.75
    assert offender.penalise(("192.0.2.7", 3)) == 2.0  # the second offence, not the third


def test_only_the_penalised_address_is_refused_and_refusals_are_counted(
    clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    offender = box()
    offender.penalise(("192.0.2.7", 443))
    with caplog.at_level("WARNING", logger=penalty_box.__name__):
        refused = [not offender.admits(("192.0.2.7", port)) for port in range(5)]
    assert refused == [True] * 5
    assert offender.admits(("192.0.2.8", 1)) and offender.admits(("127.0.0.1", 1))
    assert offender.refused == 5
    assert len(caplog.records) == 1  # one line a second at most
    assert "new connection from 192.0.2.7 refused at accept" in caplog.text


def test_an_ipv6_address_is_penalised_with_its_64(clock: list[float]) -> None:
    offender = box()
    offender.penalise(("2001:db8:1:2::1", 443, 0, 0))
    assert not offender.admits(("2001:db8:1:2:ffff::9", 1, 0, 0))
    assert offender.admits(("2001:db8:1:3::1", 1, 0, 0))
    offender.penalise(("::ffff:192.0.2.9", 443, 0, 0))  # IPv4 on an IPv6 socket
    assert not offender.admits(("192.0.2.9", 1))


def test_an_unconfigured_box_penalises_nobody(clock: list[float]) -> None:
    offender = box(None)
    assert offender.penalise(("192.0.2.7", 443)) is None
    assert offender.admits(("192.0.2.7", 1))
    assert box().penalise(None) is None  # no address known: nothing to penalise


def test_the_box_is_bounded_in_bytes_and_forgets_the_oldest_offence_first(
    clock: list[float],
) -> None:
    offender = box(Policy(first=1.0, cap=8.0, addresses=50))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(500):
            offender.penalise((f"2001:db8:{number:x}:ffff:1:2:3:4", 443, 0, 0))
            assert offender.offenders.used <= 50 * ENTRY_BYTES
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(offender.offenders) >= 50  # at least as many addresses as configured
    assert grown <= offender.offenders.used  # what is charged covers what it takes
    assert offender.admits(("2001:db8:0:ffff::1", 1, 0, 0))  # the first was forgotten
    assert not offender.admits(("2001:db8:1f3:ffff::1", 1, 0, 0))


def test_the_penalty_settings(tmp_path: Path) -> None:
    base = {"service_env": "development", "instance_dir": tmp_path}
    assert penalty_policy(load_settings(**base)) == Policy(first=1.0, cap=60.0, addresses=4096)
    assert penalty_policy(load_settings(**base, h2_abuse_penalty=0)) is None
    with pytest.raises(ConfigError, match="H2_ABUSE_PENALTY must not exceed"):
        load_settings(**base, h2_abuse_penalty=120)


# --- the gate, in this process ------------------------------------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, list[str]]:
    """A server context that notes every handshake it begins (the client's SNI), and the notes."""
    cert, key = ensure_dev_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    begun: list[str] = []
    context.sni_callback = lambda _object, name, _context: begun.append(str(name))
    return context, begun


@pytest.fixture
def penalising(clock: list[float]) -> Iterator[PenaltyBox]:
    """This process's box, configured for the test and off again after it."""
    penalty_box.BOX.configure(POLICY)
    try:
        yield penalty_box.BOX
    finally:
        penalty_box.BOX.configure(None)


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A socket bound to a free port on 127.0.0.1, as Hypercorn hands it over (not listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


async def hello(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Say hello and close."""
    writer.write(b"hello")
    await writer.drain()
    writer.close()


async def greeting(port: int, source: str) -> str:
    """What the server says to a TLS client from source, or how the connection ended."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost", local_addr=(source, 0)
        )
    except (ConnectionError, ssl.SSLError) as exc:
        return type(exc).__name__
    try:
        return (await reader.read()).decode()
    finally:
        writer.close()


@pytest.mark.parametrize("worker_class", ["uvloop", "asyncio"])
def test_a_penalised_address_is_reset_at_accept_before_its_tls_handshake(
    worker_class: str,
    tls: tuple[ssl.SSLContext, list[str]],
    penalising: PenaltyBox,
    listening: socket.socket,
) -> None:
    context, begun = tls
    port = listening.getsockname()[1]

    async def scenario() -> list[str]:
        # As Hypercorn serves each of its sockets:
        server = await asyncio.start_server(
            hello, sock=listening, ssl=context, ssl_handshake_timeout=5, backlog=16
        )
        assert isinstance(server, accept_gate.GatedServer)
        try:
            seen = [await greeting(port, "127.0.0.3")]
            penalising.penalise(("127.0.0.3", 4711))
            seen += [await greeting(port, "127.0.0.3"), await greeting(port, "127.0.0.1")]
        finally:
            server.close()
            await server.wait_closed()
        return [*seen, await greeting(port, "127.0.0.1")]

    with asyncio.Runner(loop_factory=accept_gate.loop_factory(worker_class)) as runner:
        seen = runner.run(scenario())
    assert seen == ["hello", "ConnectionResetError", "hello", "ConnectionRefusedError"]
    assert begun == ["localhost", "localhost"]  # the refused connection began no handshake
    assert penalising.refused == 1


def test_sockets_the_gate_does_not_serve_go_to_the_loop() -> None:
    async def scenario() -> list[bool]:
        server = await asyncio.start_server(hello, host="127.0.0.1", port=0)
        server.close()
        await server.wait_closed()
        return [isinstance(server, accept_gate.GatedServer)]

    with asyncio.Runner(loop_factory=accept_gate.loop_factory("uvloop")) as runner:
        assert runner.run(scenario()) == [False]


def test_the_pinned_hypercorn_worker_is_what_the_gate_replaces() -> None:
    assert accept_gate.shapes_differ("uvloop") == []
    assert accept_gate.shapes_differ("asyncio") == []


def test_a_different_worker_serve_is_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    async def worker_serve(app: Any, config: Any, *, sockets: Any = None) -> None:
        """A later Hypercorn's, say."""

    monkeypatch.setattr(hypercorn_run, "worker_serve", worker_serve)
    assert accept_gate.shapes_differ("uvloop") == ["worker_serve: parameters"]


def test_another_hypercorn_worker_runs_as_it_is_after_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[Any, ...]] = []

    def uvloop_worker(config: Any, sockets: Any = None, shutdown_event: Any = None) -> None:
        """A Hypercorn worker that does something else than 0.18's."""
        calls.append((config, sockets, shutdown_event))

    monkeypatch.setattr(hypercorn_run, "uvloop_worker", uvloop_worker)
    config = SimpleNamespace(worker_class="uvloop", penalty_policy=POLICY)
    with caplog.at_level("WARNING", logger=accept_gate.__name__):
        accept_gate.run_worker(config, "sockets", "event")
        accept_gate.run_worker(SimpleNamespace(worker_class="uvloop"), "sockets", "event")
    assert calls == [(config, "sockets", "event"), (calls[1][0], "sockets", "event")]
    with_policy, without = (record.getMessage() for record in caplog.records)
    assert "penalty box NOT installed" in with_policy
    assert "penalty box" not in without
    assert "uvloop_worker: uses" in with_policy and "uvloop_worker: uses" in without
    assert penalty_box.BOX.policy is None

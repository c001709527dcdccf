"""A stopping worker cuts TLS connections whose peers do not answer its close, and only those."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from pathlib import Path

import pytest

from service import stopping
from service.stopping import Connections
from service.tls import ensure_dev_certificate
from service.transport import accept_gate


def server_context(tmp_path: Path) -> ssl.SSLContext:
    """A server TLS context with a throwaway certificate."""
    cert, key = ensure_dev_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def silent_client(port: int) -> ssl.SSLSocket:
    """A TLS client that, once connected, reads nothing unless asked (a pool's idle socket)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(raw, server_hostname="localhost")


@pytest.mark.parametrize("worker_class", ["uvloop", "asyncio"])
@pytest.mark.parametrize("gate", [True, False], ids=["gated", "ungated"])
def test_only_closed_connections_whose_peer_is_silent_are_cut(
    tmp_path: Path, worker_class: str, gate: bool
) -> None:
    connections = Connections()
    writers: list[asyncio.StreamWriter] = []
    ended: dict[int, float] = {}

    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(writers)
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the connection ends
        ended[number] = time.monotonic()

    async def scenario() -> tuple[float, bytes]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            server = await asyncio.start_server(
                keep, sock=sock, ssl=server_context(tmp_path), ssl_handshake_timeout=5
            )
            port = sock.getsockname()[1]
            clients = [await asyncio.to_thread(silent_client, port) for _ in range(2)]
            while len(connections.open) < 2:
                await asyncio.sleep(0.01)
            server.close()
            connections.stopping()
            started = time.monotonic()
            writers[0].close()  # idle: closed at once, its peer never answers
            await asyncio.sleep(stopping.CLOSE_ANSWER_WAIT + 0.5)
            writers[1].write(b"late")  # in flight for longer: still served
            await writers[1].drain()
            answer = await asyncio.to_thread(clients[1].recv, 4)
            writers[1].close()
            for client in clients:
                client.close()
            with contextlib.suppress(ConnectionError):  # a client's close may reset
                await writers[1].wait_closed()
            return started, answer

    loop = accept_gate.loop_factory(worker_class, gate=gate, connections=connections)
    with asyncio.Runner(loop_factory=loop) as runner:
        started, answer = runner.run(scenario())
    assert answer == b"late"
    wait = stopping.CLOSE_ANSWER_WAIT
    assert wait <= ended[0] - started < wait + 0.5  # given its wait, then cut
    assert ended[1] - started >= wait + 0.5  # never closed by the server: kept past the wait
    assert connections.open == set()

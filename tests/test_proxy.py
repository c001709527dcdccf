"""The tests' TCP proxy: stop() and close() cut every connection, however far it got."""

from __future__ import annotations

import gc
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.proxy import TcpProxy

CLIENTS = 5


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    """A listener that never answers; the kernel still completes connections to it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener


def cut(client: socket.socket) -> bool:
    """Whether the other end closed this connection (within two seconds)."""
    client.settimeout(2)
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("ending", ["stop", "close"])
def test_connections_still_being_accepted_are_cut_too(upstream: socket.socket, ending: str) -> None:
    proxy = TcpProxy("127.0.0.1", upstream.getsockname()[1])
    proxy.start()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(5)

    # The clients connect while the proxy's loop is held: it takes them up in the same
    # turn as the call that ends it, as when the service opens a connection (asyncpg's
    # cancel request, say) just as a test closes the proxy.
    proxy._loop.call_soon_threadsafe(hold)
    assert held.wait(5)
    clients = [socket.create_connection(("127.0.0.1", proxy.port), 5) for _ in range(CLIENTS)]
    threading.Timer(0.2, release.set).start()
    try:
        getattr(proxy, ending)()
        assert [cut(client) for client in clients] == [True] * CLIENTS
    finally:
        for client in clients:
            client.close()
        if ending == "stop":
            proxy.close()
    del proxy
    gc.collect()  # a transport the proxy left open would warn here, in this test

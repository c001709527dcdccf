"""A stopping worker does not wait for TLS peers that never answer its close.

Closing a TLS connection sends close_notify; asyncio and uvloop then wait for the peer's
(ssl_shutdown_timeout: 30 s, as Hypercorn sets none) before the connection counts as
closed. At a stop Hypercorn closes idle keep-alive connections at once, but a client that
holds one without reading it (an idle connection in a synchronous client's pool, a peer
gone away) never answers: the worker waited graceful_timeout for that connection's task,
then the rest of the 30 s, and so did the stop. Neither TLS 1.2 nor 1.3 requires the
closing side to wait for the peer's close_notify (RFC 5246 7.2.1, RFC 8446 6.1). So once
the worker stops, a TLS connection it closed is aborted when its peer has not answered
within CLOSE_ANSWER_WAIT: its socket closes (what the kernel already holds for the peer
still goes; what the loop could not yet hand the kernel, for a peer that read nothing in
that time, is dropped). Requests in flight are untouched until they finish and their
connection closes. Outside a stop, every close is the loop's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

CLOSE_ANSWER_WAIT = 1.0  # seconds, from the close, for a peer to answer it during a stop
CHECK_INTERVAL = 0.1  # seconds between two looks at the connections during a stop


class Tracked(asyncio.Protocol):
    """A connection's own protocol, unchanged, with its transport known to Connections."""

    def __init__(self, protocol: asyncio.Protocol, connections: Connections) -> None:
        self.protocol = protocol
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.closing_since: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.connections.open.add(self)
        self.protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.open.discard(self)
        self.protocol.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()


class Connections:
    """A worker's open TLS connections, and what happens to them once it stops."""

    def __init__(self) -> None:
        self.open: set[Tracked] = set()
        self._dropping: asyncio.Task[None] | None = None

    def track(self, factory: Callable[[], Any]) -> Callable[[], Tracked]:
        """A protocol factory for the loop: factory's protocols, each tracked."""
        return lambda: Tracked(factory(), self)

    def stopping(self) -> None:
        """The worker stops: from now on, abort closed connections whose peers do not answer."""
        if self._dropping is None:
            self._dropping = asyncio.get_running_loop().create_task(self._drop_unanswered())

    async def _drop_unanswered(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for connection in list(self.open):
                transport = connection.transport
                if transport is None or not transport.is_closing():
                    continue
                if connection.closing_since is None:
                    connection.closing_since = now
                elif now - connection.closing_since >= CLOSE_ANSWER_WAIT:
                    transport.abort()
            await asyncio.sleep(CHECK_INTERVAL)

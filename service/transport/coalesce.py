"""Coalesce Hypercorn's writes to a connection within one event-loop iteration.

Hypercorn writes every protocol event on its own: an HTTP/1.1 response is a write for the
head and one for the body, and an HTTP/2 connection writes after each frame of each stream.
Over TLS each write is a record of its own and a send() system call. Writes queued during
one loop iteration now leave together (immediately past FLUSH_BYTES), in the same order.
"""

from __future__ import annotations

from typing import Any

from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.events import Closed, Event, RawData

from service.transport.shapes import Shape, differing

FLUSH_BYTES = 64 * 1024

_original_send = TCPServer.protocol_send
_original_close = TCPServer._close
_original_server_close = TCPServer._initiate_server_close


def _flush(server: Any) -> None:
    """Write what this connection queued, as one write."""
    chunks: list[bytes] | None = server.__dict__.pop("_coalesced", None)
    if not chunks:
        return
    try:
        server.writer.write(b"".join(chunks))
    except (ConnectionError, RuntimeError):
        server._coalesce_closing = server.loop.create_task(server.protocol.handle(Closed()))


async def protocol_send(self: Any, event: Event) -> None:
    """Queue raw data for the end of this loop iteration; anything else as Hypercorn does."""
    if not isinstance(event, RawData):
        if isinstance(event, Closed):
            _flush(self)
        await _original_send(self, event)
        return
    chunks: list[bytes] | None = self.__dict__.get("_coalesced")
    if chunks is None:
        chunks = self._coalesced = []
        self._coalesced_bytes = 0
        self.loop.call_soon(_flush, self)
    chunks.append(event.data)
    self._coalesced_bytes += len(event.data)
    if self._coalesced_bytes >= FLUSH_BYTES:
        _flush(self)
    try:
        await self.writer.drain()
    except (ConnectionError, RuntimeError):
        await self.protocol.handle(Closed())


async def close(self: Any) -> None:
    """Hypercorn's close, after writing what is queued."""
    _flush(self)
    await _original_close(self)


async def initiate_server_close(self: Any) -> None:
    """Hypercorn's server-side close, after writing what is queued."""
    _flush(self)
    await _original_server_close(self)


SHAPES = [
    Shape(
        "TCPServer.__init__",
        TCPServer.__init__,
        ["self", "app", "loop", "config", "context", "state", "reader", "writer"],
        {"loop", "writer"},
    ),
    Shape(
        "TCPServer.protocol_send",
        _original_send,
        ["self", "event"],
        {"RawData", "Closed", "data", "write", "drain", "writer", "protocol", "handle"},
    ),
    Shape("TCPServer._close", _original_close, ["self"], {"writer", "close"}),
    Shape(
        "TCPServer._initiate_server_close",
        _original_server_close,
        ["self"],
        {"Closed", "handle", "writer", "close"},
    ),
]


def shapes_differ() -> list[str]:
    """What of Hypercorn's internals this change relies on is not as it expects."""
    return differing(
        SHAPES, {"RawData.data": "data" in getattr(RawData, "__dataclass_fields__", {})}
    )


def install() -> None:
    """Patch Hypercorn's asyncio TCP server (idempotent; per process)."""
    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    TCPServer._close = close  # type: ignore[method-assign]
    TCPServer._initiate_server_close = initiate_server_close  # type: ignore[method-assign]

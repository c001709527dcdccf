"""HTTP/2 abuse answered with GOAWAY ENHANCE_YOUR_CALM, as nghttp2, Go and h2o answer it.

Hypercorn with h2 answered every SETTINGS and PING and started the application for
every stream however soon the client reset it, without limit: a PING or SETTINGS flood
on one connection stalled a worker, and a rapid-reset client (CVE-2023-44487) was
stopped only by an unhandled priority.TooManyStreamsError. Now each frame h2 receives is
first taken from its connection's budget (h2_budgets.py); a client that spends one is
sent GOAWAY ENHANCE_YOUR_CALM, its connection cut, and one line logged. Besides:

- a stream opened past the advertised MAX_CONCURRENT_STREAMS is refused alone
  (RST_STREAM REFUSED_STREAM, RFC 9113 section 5.1.2) where h2 ended the connection;
- streams reset while their application still runs count as open until it returns (as
  Go's server counts them), so resets cannot pile up work; a stream reset in the read
  that opened it never starts;
- h2 gets reads in READ_SLICE pieces, so that one read of small frames cannot hold the
  event loop for tens of ms;
- PRIORITY signals name only streams that exist (RFC 9113 deprecates them; a tree of
  phantom streams is what overflowed), and the priority tree's errors stay inside
  Hypercorn's send task; DATA for a stream Hypercorn has finished is dropped, not a
  KeyError.

The versions are pinned, and `shapes_differ` checks at start-up that the internals used
here are as expected; if not, one warning is logged and the libraries are left alone.
See docs/performance.md, "Library changes".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.stream
import hypercorn.asyncio.task_group
from hypercorn.events import RawData
from hypercorn.protocol.h2 import H2Protocol
from hyperframe.frame import DataFrame, Frame, RstStreamFrame
from priority.priority import PriorityError, TooManyStreamsError

from service.transport.h2_budgets import (
    EMPTY_DATA,
    FRAME_KINDS,
    RAPID_RESET_COST,
    REFUSED,
    ConnectionGuard,
)
from service.transport.shapes import Shape, differing, library_versions

log = logging.getLogger(__name__)


# h2 handles all the frames of one read before anything else runs: 64 KiB of small frames
# held the event loop for tens of ms. Larger reads are handed over in slices.
READ_SLICE = 2048
GUARD = "_h2_guard"
_REFUSED = h2.errors.ErrorCodes.REFUSED_STREAM
_CLOSED = h2.connection.ConnectionState.CLOSED

_original: dict[str, Callable[..., Any]] = {
    "protocol_init": H2Protocol.__init__,
    "handle": H2Protocol.handle,
    "handle_events": H2Protocol._handle_events,
    "create_stream": H2Protocol._create_stream,
    "priority_updated": H2Protocol._priority_updated,
    "send_data": H2Protocol._send_data,
    "receive_frame": h2.connection.H2Connection._receive_frame,
    "receive_headers_frame": h2.connection.H2Connection._receive_headers_frame,
    "handle_app": hypercorn.asyncio.task_group._handle,
}


def protocol_init(self: Any, *args: Any, **kwargs: Any) -> None:
    """Hypercorn's H2Protocol, with a guard for its connection."""
    _original["protocol_init"](self, *args, **kwargs)
    server = getattr(self.send, "__self__", None)  # Hypercorn's TCPServer
    guard = ConnectionGuard(
        self.client, getattr(getattr(server, "writer", None), "transport", None)
    )
    self.__dict__[GUARD] = guard
    self.connection.__dict__[GUARD] = guard


def receive_frame(self: Any, frame: Frame) -> list[h2.events.Event]:
    """h2's frame dispatch, after taking the frame from its budget."""
    guard = self.__dict__.get(GUARD)
    if guard is not None:
        kind = FRAME_KINDS.get(type(frame))
        if kind is None and type(frame) is DataFrame:
            if not frame.data and "END_STREAM" not in frame.flags:
                guard.spend(EMPTY_DATA)
        elif kind is FRAME_KINDS[RstStreamFrame]:
            guard.spend(kind, RAPID_RESET_COST if frame.stream_id in guard.fresh else 1)
            guard.resets_seen = True
            if frame.stream_id in guard.running:  # before the next HEADERS is counted
                guard.orphans.add(frame.stream_id)
        elif kind is not None:
            guard.spend(kind)
    events: list[h2.events.Event] = _original["receive_frame"](self, frame)
    return events


def receive_headers_frame(self: Any, frame: Any) -> tuple[list[Frame], list[h2.events.Event]]:
    """h2's HEADERS handling; a stream past the concurrency limit is refused, alone."""
    guard = self.__dict__.get(GUARD)
    original = _original["receive_headers_frame"]
    if guard is None or frame.stream_id in self.streams:
        return original(self, frame)  # type: ignore[no-any-return]
    limit = self.local_settings.max_concurrent_streams
    # self.streams holds the open streams and more: counting those is rarely needed.
    if len(self.streams) + len(guard.orphans) < limit or (
        self.open_inbound_streams + len(guard.orphans) < limit
    ):
        guard.credit()
        guard.fresh.add(frame.stream_id)
        return original(self, frame)  # type: ignore[no-any-return]
    guard.spend(REFUSED)
    # Opened first, so that h2 neither refuses the whole connection nor skips the header
    # block (HPACK state is the connection's); then reset, and no event reaches Hypercorn.
    self._begin_new_stream(frame.stream_id, h2.connection.AllowedStreamIDs.ODD)
    frames, events = original(self, frame)
    frames = [*frames, *self.streams[frame.stream_id].reset_stream(_REFUSED)]
    return frames, [e for e in events if getattr(e, "stream_id", None) != frame.stream_id]


async def handle(self: Any, event: Any) -> None:
    """Hypercorn's handling of a read, in slices of READ_SLICE bytes, yielding in between."""
    handle_original = _original["handle"]
    if type(event) is not RawData or len(event.data) <= READ_SLICE or self.closed:
        await handle_original(self, event)
        return
    data = event.data
    for start in range(0, len(data), READ_SLICE):
        await handle_original(self, RawData(data=data[start : start + READ_SLICE]))
        if self.closed or self.connection.state_machine.state is _CLOSED:
            return  # the rest would only meet the closed connection's error again
        await asyncio.sleep(0)


async def handle_events(self: Any, events: list[h2.events.Event]) -> None:
    """Hypercorn's event handling, for the events the guard lets through."""
    guard = self.__dict__.get(GUARD)
    if guard is not None:
        events = guard.screen(self, events)
    await _original["handle_events"](self, events)


async def create_stream(self: Any, request: h2.events.RequestReceived) -> None:
    """Hypercorn's stream creation; a stream its scheduler cannot take is refused."""
    try:
        await _original["create_stream"](self, request)
    except TooManyStreamsError:
        self.streams.pop(request.stream_id, None)
        self.stream_buffers.pop(request.stream_id, None)
        self.connection.reset_stream(request.stream_id, _REFUSED)


async def priority_updated(self: Any, event: h2.events.PriorityUpdated) -> None:
    """Hypercorn's reprioritisation, for streams it sends on and parents that exist."""
    if event.stream_id not in self.stream_buffers:
        return  # an idle or finished stream: nothing to schedule
    if event.depends_on and event.depends_on not in self.stream_buffers:
        event.depends_on = 0  # the tree would grow a phantom parent
    with contextlib.suppress(PriorityError):
        await _original["priority_updated"](self, event)


async def send_data(self: Any, stream_id: int) -> None:
    """Hypercorn's send step; a stream its own clean-up finds gone leaves quietly."""
    try:
        await _original["send_data"](self, stream_id)
    except (KeyError, PriorityError):  # MissingStreamError is a KeyError
        self.stream_buffers.pop(stream_id, None)
        with contextlib.suppress(PriorityError):
            self.priority.remove_stream(stream_id)


async def handle_app(
    app: Any, config: Any, scope: Any, receive: Any, send: Any, *rest: Any
) -> None:
    """Hypercorn's application task, noting while it runs for which HTTP/2 stream."""
    stream = getattr(send, "__self__", None)
    protocol = getattr(getattr(stream, "send", None), "__self__", None)
    guard = getattr(protocol, "__dict__", {}).get(GUARD)
    if guard is None:
        await _original["handle_app"](app, config, scope, receive, send, *rest)
        return
    stream_id = stream.stream_id  # type: ignore[union-attr]
    guard.running.add(stream_id)
    try:
        await _original["handle_app"](app, config, scope, receive, send, *rest)
    finally:
        guard.running.discard(stream_id)
        guard.orphans.discard(stream_id)


# What the replacements rely on: each original's parameters, and the names its code uses.
SHAPES: list[Shape] = [
    Shape(
        "protocol_init",
        _original["protocol_init"],
        [
            "self",
            "app",
            "config",
            "context",
            "task_group",
            "connection_state",
            "ssl",
            "client",
            "server",
            "send",
        ],
        {"connection", "client", "send", "streams", "stream_buffers", "priority"},
    ),
    Shape(
        "handle",
        _original["handle"],
        ["self", "event"],
        {"RawData", "receive_data", "data", "closed"},
    ),
    Shape("handle_events", _original["handle_events"], ["self", "events"], {"streams"}),
    Shape(
        "create_stream",
        _original["create_stream"],
        ["self", "request"],
        {"streams", "stream_buffers", "priority", "insert_stream"},
    ),
    Shape(
        "priority_updated",
        _original["priority_updated"],
        ["self", "event"],
        {"reprioritize", "insert_stream", "depends_on"},
    ),
    Shape(
        "send_data",
        _original["send_data"],
        ["self", "stream_id"],
        {"stream_buffers", "priority", "remove_stream"},
    ),
    Shape(
        "receive_frame", _original["receive_frame"], ["self", "frame"], {"_frame_dispatch_table"}
    ),
    Shape(
        "receive_headers_frame",
        _original["receive_headers_frame"],
        ["self", "frame"],
        {"TooManyStreamsError", "max_concurrent_streams", "_get_or_create_stream"},
    ),
    Shape(
        "handle_app",
        _original["handle_app"],
        ["app", "config", "scope", "receive", "send", "sync_spawn", "call_soon"],
    ),
]


def shapes_differ() -> list[str]:
    """What of the libraries' internals the guard relies on is not as it expects."""
    checks = {
        "spawn_app calls _handle": "_handle"
        in hypercorn.asyncio.task_group.TaskGroup.spawn_app.__code__.co_names,
        "receive_data sends GOAWAY on ProtocolError": "_terminate_connection"
        in h2.connection.H2Connection.receive_data.__code__.co_names,
        "DenialOfServiceError is ENHANCE_YOUR_CALM": h2.exceptions.DenialOfServiceError.error_code
        == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
        "H2Connection._begin_new_stream, open_inbound_streams": all(
            hasattr(h2.connection.H2Connection, attr)
            for attr in ("_begin_new_stream", "open_inbound_streams")
        ),
        "AllowedStreamIDs.ODD": hasattr(h2.connection, "AllowedStreamIDs"),
        "ConnectionState.CLOSED": "state_machine"
        in h2.connection.H2Connection.__init__.__code__.co_names,
        "H2Stream.reset_stream": hasattr(h2.stream.H2Stream, "reset_stream"),
    }
    return differing(SHAPES, checks)


def install() -> None:
    """Guard Hypercorn's HTTP/2 connections (idempotent; per process), if the shapes hold."""
    differ = shapes_differ()
    if differ:
        log.warning(
            "HTTP/2 abuse guard NOT installed: library internals differ (%s; %s); "
            "the libraries' own behaviour applies",
            "; ".join(differ),
            library_versions(),
        )
        return
    H2Protocol.__init__ = protocol_init  # type: ignore[method-assign]
    H2Protocol.handle = handle  # type: ignore[method-assign]
    H2Protocol._handle_events = handle_events  # type: ignore[method-assign]
    H2Protocol._create_stream = create_stream  # type: ignore[method-assign]
    H2Protocol._priority_updated = priority_updated  # type: ignore[method-assign]
    H2Protocol._send_data = send_data  # type: ignore[method-assign]
    h2.connection.H2Connection._receive_frame = receive_frame  # type: ignore[method-assign]
    h2.connection.H2Connection._receive_headers_frame = receive_headers_frame  # type: ignore[method-assign]
    hypercorn.asyncio.task_group._handle = handle_app  # type: ignore[assignment]

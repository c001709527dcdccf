"""HTTP/2 response bodies that fit the flow-control window go out at once.

Hypercorn hands every HTTP/2 response body to the connection's send task: the body is
buffered, an event wakes the task, a priority tree picks the stream, and the view's task
waits until the buffer has drained. That is two or three more loop iterations per
response, for bodies that nearly always fit one frame. Such a body is now written
directly; when it is the response's last, it carries the end of the stream itself,
instead of an empty DATA frame after it (one frame and one flush fewer per response).
A stream that once needs the send task (a body larger than its window or a frame)
keeps using it to the end, so data is never reordered.
"""

from __future__ import annotations

import contextlib
from typing import Any

import h2.connection
import h2.exceptions
from hypercorn.protocol.events import Body, EndBody, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.http_stream import HTTPStream
from priority.priority import MissingStreamError, PriorityTree

from service.transport.shapes import Shape, differing

_original_stream_send = H2Protocol.stream_send
_original_app_send = HTTPStream.app_send
_stock_protocol_init = H2Protocol.__init__  # h2_guard wraps it
QUEUED = "_streams_sent_by_task"
ENDED = "_streams_ended_by_their_body"
LAST_BODY = "_sending_last_body"


SHAPES = [
    Shape(
        "H2Protocol.stream_send",
        _original_stream_send,
        ["self", "event"],
        {"Body", "EndBody", "StreamClosed", "stream_buffers", "priority", "_flush"},
    ),
    Shape(
        "H2Protocol.__init__",
        _stock_protocol_init,
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
        {"connection", "streams", "stream_buffers", "priority"},
    ),
    Shape("H2Protocol._flush", H2Protocol._flush, ["self"], {"data_to_send"}),
    Shape("HTTPStream.app_send", _original_app_send, ["self", "message"], {"response", "Body"}),
    Shape(
        "H2Connection.send_data",
        h2.connection.H2Connection.send_data,
        ["self", "stream_id", "data", "end_stream", "pad_length"],
    ),
    Shape("H2Connection.end_stream", h2.connection.H2Connection.end_stream, ["self", "stream_id"]),
    Shape(
        "H2Connection.local_flow_control_window",
        h2.connection.H2Connection.local_flow_control_window,
        ["self", "stream_id"],
    ),
    Shape(
        "H2Connection.__init__",
        h2.connection.H2Connection.__init__,
        ["self", "config"],
        {"max_outbound_frame_size"},
    ),
    Shape("PriorityTree.remove_stream", PriorityTree.remove_stream, ["self", "stream_id"]),
]


def shapes_differ() -> list[str]:
    """What of Hypercorn's and h2's internals this change relies on is not as it expects."""
    return differing(SHAPES)


def install() -> None:
    """Route Hypercorn's HTTP/2 stream sends through stream_send below (idempotent)."""
    H2Protocol.stream_send = stream_send  # type: ignore[method-assign]
    HTTPStream.app_send = app_send  # type: ignore[method-assign]


async def app_send(self: Any, message: Any) -> None:
    """Hypercorn's app_send, noting first whether a body message is the response's last."""
    if message is not None and message["type"] == "http.response.body":
        # Trailers follow the last body of a response that announced them. (A body before
        # the response's start has none: Hypercorn refuses it, as before.)
        response = self.__dict__.get("response") or {}
        last = not message.get("more_body", False) and not response.get("trailers", False)
        self.__dict__[LAST_BODY] = last
    await _original_app_send(self, message)


async def stream_send(self: Any, event: StreamEvent) -> None:
    """Send a fitting body, or the end of a stream sent so far directly, at once."""
    if isinstance(event, Body | EndBody):
        stream_id = event.stream_id
        if isinstance(event, EndBody) and stream_id in self.__dict__.get(ENDED, ()):
            self.__dict__[ENDED].discard(stream_id)
            return  # its last body ended it
        queued: set[int] = self.__dict__.setdefault(QUEUED, set())
        if stream_id not in queued:
            if _sent_directly(self, event):
                await self._flush()
                return
            queued.add(stream_id)
    elif isinstance(event, StreamClosed):
        self.__dict__.get(QUEUED, set()).discard(event.stream_id)
        self.__dict__.get(ENDED, set()).discard(event.stream_id)
    await _original_stream_send(self, event)


def _sent_directly(protocol: Any, event: Body | EndBody) -> bool:
    """Hand the body (or the stream's end) to h2 unless the send task must; whether it did.

    A direct stream's buffer stays empty, so the send task never waits on it: when a
    window update wakes the task for it, the task finds nothing to send and moves on.
    """
    stream_id, connection = event.stream_id, protocol.connection
    if stream_id not in protocol.stream_buffers:
        return False  # reset or closed: Hypercorn's path knows what to do
    try:
        if isinstance(event, EndBody):
            connection.end_stream(stream_id)
            ended = True
        else:
            window = connection.local_flow_control_window(stream_id)
            if len(event.data) > min(window, connection.max_outbound_frame_size):
                return False
            stream = protocol.streams.get(stream_id)
            ended = bool(stream is not None and stream.__dict__.get(LAST_BODY))
            connection.send_data(stream_id, event.data, end_stream=ended)
            if ended:
                protocol.__dict__.setdefault(ENDED, set()).add(stream_id)
    except h2.exceptions.ProtocolError:
        return False
    if ended:
        # As the send task does once a stream's buffer is complete.
        del protocol.stream_buffers[stream_id]
        with contextlib.suppress(MissingStreamError):
            protocol.priority.remove_stream(stream_id)
    return True

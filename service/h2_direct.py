"""HTTP/2 response bodies that fit the flow-control window go out at once.

Hypercorn hands every HTTP/2 response body to the connection's send task: the body is
buffered, an event wakes the task, a priority tree picks the stream, and the view's task
waits until the buffer has drained. That is two or three more loop iterations per
response, for bodies that nearly always fit one frame. Such a body is now written
directly, and its stream ended with it. A stream that once needs the send task (a body
larger than its window or a frame) keeps using it to the end, so data is never reordered.
"""

from __future__ import annotations

import contextlib
from typing import Any

import h2.exceptions
from hypercorn.protocol.events import Body, EndBody, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from priority.priority import MissingStreamError

_original_stream_send = H2Protocol.stream_send
QUEUED = "_streams_sent_by_task"


def install() -> None:
    """Route Hypercorn's HTTP/2 stream sends through stream_send below (idempotent)."""
    H2Protocol.stream_send = stream_send  # type: ignore[method-assign]


async def stream_send(self: Any, event: StreamEvent) -> None:
    """Send a fitting body, or the end of a stream sent so far directly, at once."""
    if isinstance(event, Body | EndBody):
        queued: set[int] = self.__dict__.setdefault(QUEUED, set())
        if event.stream_id not in queued:
            if _sent_directly(self, event):
                await self._flush()
                return
            queued.add(event.stream_id)
    elif isinstance(event, StreamClosed):
        self.__dict__.get(QUEUED, set()).discard(event.stream_id)
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
        elif event.data:
            window = connection.local_flow_control_window(stream_id)
            if len(event.data) > min(window, connection.max_outbound_frame_size):
                return False
            connection.send_data(stream_id, event.data)
    except h2.exceptions.ProtocolError:
        return False
    if isinstance(event, EndBody):
        # As the send task does once a stream's buffer is complete.
        del protocol.stream_buffers[stream_id]
        with contextlib.suppress(MissingStreamError):
            protocol.priority.remove_stream(stream_id)
    return True

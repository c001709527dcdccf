"""A bare HTTP/2 (h2c) client: sends header lists as they are and reports each stream's events."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.events

Headers = list[tuple[bytes, bytes]]
CLOSED = "connection closed"


async def exchange(port: int, requests: list[Headers]) -> list[list[Any] | str]:
    """Send each request (one after another, one connection); the events of each stream.

    h2's own checks and rewriting of what it sends are off, so a request goes out exactly
    as given. A stream's events end with StreamEnded or StreamReset; once the server
    closes the connection, the remaining requests get CLOSED.
    """
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    connection = h2.connection.H2Connection(config)
    connection.initiate_connection()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers: list[list[Any] | str] = []
    try:
        for headers in requests:
            stream_id = connection.get_next_available_stream_id()
            connection.send_headers(stream_id, headers, end_stream=True)
            writer.write(connection.data_to_send())
            answer = await _stream_events(connection, reader, writer, stream_id)
            answers.append(answer)
            if answer == CLOSED:
                break
    finally:
        writer.close()
        await writer.wait_closed()
    return answers + [CLOSED] * (len(requests) - len(answers))


async def _stream_events(
    connection: h2.connection.H2Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stream_id: int,
) -> list[Any] | str:
    events: list[Any] = []
    while True:
        data = await asyncio.wait_for(reader.read(65536), 5)
        if not data:
            return CLOSED
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.ConnectionTerminated):
                return CLOSED
            if getattr(event, "stream_id", None) != stream_id:
                continue
            events.append(event)
            if isinstance(event, h2.events.DataReceived):
                connection.acknowledge_received_data(event.flow_controlled_length, stream_id)
            if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                writer.write(connection.data_to_send())
                return events
        writer.write(connection.data_to_send())


def status(events: list[Any] | str) -> bytes | str:
    """The response status of a stream, or how it was refused."""
    if isinstance(events, str):
        return events
    for event in events:
        if isinstance(event, h2.events.ResponseReceived):
            return dict(event.headers)[b":status"]
        if isinstance(event, h2.events.StreamReset):
            return "stream reset"
    return "no response"

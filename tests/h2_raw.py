"""Bare HTTP/2 clients: header lists sent as they are (h2c), or any frames at all (TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from service.transport import coalesce
from tests.servers import enabled_changes

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


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_BYTES = 16384  # SETTINGS_MAX_FRAME_SIZE before either side changes it


class RawH2:
    """An HTTP/2 connection over TLS that writes whatever frames it is given.

    It reads the server's frames itself (an h2 client would refuse to follow a misbehaving
    one): statuses and resets per stream, the GOAWAY error code, and the end of the
    connection. Flow-control credit is returned for every DATA frame.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder(max_header_list_size=1 << 20)
        self.statuses: dict[int, int] = {}
        self.resets: dict[int, int] = {}
        self.data: dict[int, list[tuple[bytes, bool]]] = {}  # DATA frames: body, END_STREAM
        self.done: dict[int, asyncio.Future[str]] = {}
        self.goaway: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.closed = asyncio.Event()
        self.next_stream_id = 1
        self.max_concurrent_streams: int | None = None
        self._reading = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, source: str | None = None) -> RawH2:
        """Connect (https: TLS with ALPN h2; http: h2c) and send the preface.

        With source, the socket is bound to that address before it connects (any of 127/8
        reaches a server on 127.0.0.1).
        """
        scheme, _, address = url.rstrip("/").partition("://")
        host, port = address.rsplit(":", 1)
        local = {"local_addr": (source, 0)} if source else {}
        if scheme == "http":
            reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20, **local)
        else:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["h2"])
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=context, server_hostname=host, limit=1 << 20, **local
            )
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        connection = cls(reader, writer)
        await connection.send(PREFACE + SettingsFrame(0).serialize())
        return connection

    async def send(self, data: bytes) -> bool:
        """Write bytes; False once the server has closed the connection."""
        if self.closed.is_set():
            return False
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    def headers(
        self,
        headers: list[tuple[bytes, bytes]],
        *,
        end_stream: bool = True,
        plain: int = 4096,
        depends_on: int | None = None,
    ) -> tuple[int, bytes]:
        """A new stream's id and its HEADERS (+ CONTINUATION) frames.

        Values longer than `plain` bytes go as plain literals (quick to decode), the rest
        Huffman-coded, as browsers send them. With depends_on, the HEADERS carries a priority.
        """
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        self.done[stream_id] = asyncio.get_running_loop().create_future()
        block = b"".join(
            self.encoder.encode([header], huffman=len(header[1]) <= plain) for header in headers
        )
        chunks = [block[at : at + FRAME_BYTES] for at in range(0, len(block), FRAME_BYTES)]
        first = HeadersFrame(stream_id, flags=["END_STREAM"] if end_stream else [])
        first.data = chunks[0]
        if depends_on is not None:
            first.flags.add("PRIORITY")
            first.depends_on, first.stream_weight = depends_on, 16
        frames = [first]
        for chunk in chunks[1:]:
            frames.append(ContinuationFrame(stream_id))
            frames[-1].data = chunk
        frames[-1].flags.add("END_HEADERS")
        return stream_id, b"".join(frame.serialize() for frame in frames)

    async def request(self, headers: list[tuple[bytes, bytes]], timeout: float = 10.0) -> str:
        """Send one request without a body; its status ("200") or how it ended."""
        stream_id, frames = self.headers(headers)
        await self.send(frames)
        return await self.outcome(stream_id, timeout)

    async def outcome(self, stream_id: int, timeout: float = 10.0) -> str:
        """The status of a stream once it ended, "reset <code>", or CLOSED."""
        return await asyncio.wait_for(asyncio.shield(self.done[stream_id]), timeout)

    async def close(self) -> None:
        """Close the socket and stop reading."""
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            await self.writer.wait_closed()

    async def _read(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(9)
                frame, length = Frame.parse_frame_header(memoryview(head))
                frame.parse_body(memoryview(await self.reader.readexactly(length)))
                self._received(frame)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            self.closed.set()
            if not self.goaway.done():
                self.goaway.set_exception(ConnectionError("closed without GOAWAY"))
                self.goaway.exception()  # retrieved: a test may not ask
            for future in self.done.values():
                if not future.done():
                    future.set_result(CLOSED)

    def _received(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            limit = frame.settings.get(SettingsFrame.MAX_CONCURRENT_STREAMS)
            self.max_concurrent_streams = limit or self.max_concurrent_streams
            self.writer.write(SettingsFrame(0, flags=["ACK"]).serialize())
        elif isinstance(frame, HeadersFrame):  # responses here fit one frame
            headers = dict(self.decoder.decode(frame.data, raw=True))
            if b":status" in headers:
                self.statuses[stream_id] = int(headers[b":status"])
        elif isinstance(frame, DataFrame):
            self.data.setdefault(stream_id, []).append((frame.data, "END_STREAM" in frame.flags))
            self._credit(frame)
        elif isinstance(frame, RstStreamFrame):
            self.resets[stream_id] = frame.error_code
            self._end(stream_id, f"reset {frame.error_code}")
        elif isinstance(frame, GoAwayFrame) and not self.goaway.done():
            self.goaway.set_result(frame.error_code)
        if "END_STREAM" in frame.flags:
            self._end(stream_id, str(self.statuses.get(stream_id, "no status")))

    def _credit(self, frame: DataFrame) -> None:
        """Give back the flow-control credit a DATA frame took."""
        if frame.flow_controlled_length:
            for credit_to in (0, frame.stream_id):
                update = WindowUpdateFrame(credit_to)
                update.window_increment = frame.flow_controlled_length
                self.writer.write(update.serialize())

    def _end(self, stream_id: int, outcome: str) -> None:
        future = self.done.get(stream_id)
        if future is not None and not future.done():
            future.set_result(outcome)


CHUNK = bytes(range(256)) * 200  # 51,200 bytes: some writes cross FLUSH_BYTES, some not


async def chunked_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app answering with 10 numbered chunks (so that order shows), or /small."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if scope["path"] == "/small":
        await send({"type": "http.response.body", "body": b"ok"})
        return
    for number in range(10):
        await send(
            {"type": "http.response.body", "body": b"%d:" % number + CHUNK, "more_body": True}
        )
    await send({"type": "http.response.body", "body": b"end"})


@contextlib.asynccontextmanager
async def serving(app: Any, **settings: Any) -> AsyncIterator[str]:
    """Hypercorn (writes coalesced) serving an ASGI app over h2c on a free port, in this loop.

    Unless LIBRARY_CHANGES leaves coalesce out: then Hypercorn writes as it does itself.
    """
    if "coalesce" in enabled_changes():
        coalesce.install()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    for name, value in settings.items():
        setattr(config, name, value)
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    for _ in range(100):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        await task

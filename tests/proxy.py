"""A TCP proxy the tests can cut, restore or freeze, to play an unreachable or hung backend."""

from __future__ import annotations

import asyncio
import contextlib
import threading


class TcpProxy:
    """Forward 127.0.0.1:port to an upstream; stop() drops every connection at once.

    freeze() plays a hung server (a stopped process, a network black hole): connections
    are still accepted, but nothing is relayed either way, not even a new connection's
    start-up, until thaw(); what was sent meanwhile is then delivered, as a resumed
    process would read it.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    def start(self) -> None:
        """Listen (again, on the same port once one was chosen)."""
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)

    def stop(self) -> None:
        """Stop listening and cut every open connection."""
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(5)

    def freeze(self) -> None:
        """Accept connections but relay nothing, in either direction, until thaw()."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def thaw(self) -> None:
        """Relay again, starting with whatever waited during the freeze."""
        self._loop.call_soon_threadsafe(self._flowing.set)

    def close(self) -> None:
        """Stop and end the proxy's thread."""
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._writers.add(writer)
        await self._flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            _pipe(reader, up_writer, self._flowing), _pipe(up_reader, writer, self._flowing)
        )


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event
) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while True:
            await flowing.wait()
            data = await reader.read(65536)
            if not data:
                break
            await flowing.wait()  # a chunk read just before a freeze waits for the thaw
            writer.write(data)
            await writer.drain()
    writer.transport.abort()

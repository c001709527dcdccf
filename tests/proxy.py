"""A TCP proxy the tests can cut, restore or freeze, to play an unreachable or hung backend."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any


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
        # Every stream the proxy holds open, either side, from the moment it exists.
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    def start(self) -> None:
        """Listen (again, on the same port once one was chosen)."""
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)

    def stop(self) -> None:
        """Stop listening and cut every open connection, however far it got."""
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(5)

    def freeze(self) -> None:
        """Accept connections but relay nothing, in either direction, until thaw()."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def thaw(self) -> None:
        """Relay again, starting with whatever waited during the freeze."""
        self._loop.call_soon_threadsafe(self._flowing.set)

    def close(self) -> None:
        """Stop and end the proxy's thread; stop() has closed every socket by then."""
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            # Take no more connections, let those taken reach _accept, and only then close
            # the listener: asyncio (3.11) sets each accepted connection up in a task of
            # its own, and one that runs after the close fails to attach to the server,
            # leaving its socket open and unknown to the proxy (said only in debug mode).
            for listener in self._server.sockets:
                self._loop.remove_reader(listener.fileno())
            current = asyncio.current_task()
            if accepting := asyncio.all_tasks() - self._tasks - {current}:
                await asyncio.wait(accepting)  # every other task is one of the proxy's own
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        writers = list(self._writers)
        self._writers.clear()
        for writer in writers:
            writer.transport.abort()
        # A socket is closed once its connection_lost has run: before the loop may close.
        await asyncio.gather(*(writer.wait_closed() for writer in writers), return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Runs in connection_made: the connection is known before any await can miss it.
        self._writers.add(writer)
        self._spawn(self._relay(reader, writer))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run coro as a task of the proxy's own, which stop() cancels."""
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        self._spawn(_pipe(up_reader, writer, self._flowing))
        await _pipe(reader, up_writer, self._flowing)


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

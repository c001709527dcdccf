"""Revocation checks from the server's event loop, pipelined: one write per batch.

Checks that arrive while a batch is on the wire are sent together as the next batch, so
under load one Redis round trip answers many requests and the loop never blocks on Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import NoScriptError, RedisError

Command = tuple[Any, ...]
CommandFactory = Callable[[str], Command]
Pending = tuple[CommandFactory, "asyncio.Future[Any]"]


class CheckPipeline:
    """One connection, owned by the loop that creates this; commands get the run_id last."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        script: str,
        read_run_id: Callable[[object], str],
    ) -> None:
        self._pool = aredis.ConnectionPool.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._timeout = timeout
        self._script = script
        self._read_run_id = read_run_id
        self._queue: list[Pending] = []
        self._sender: asyncio.Task[None] | None = None
        self._connection: Any = None
        self._run_id = ""
        self._loop = asyncio.get_running_loop()
        self._pid = os.getpid()

    @property
    def usable(self) -> bool:
        """Whether this pipeline belongs to the running loop of this process."""
        return self._loop is asyncio.get_running_loop() and self._pid == os.getpid()

    async def call(self, command: CommandFactory) -> Any:
        """Queue one command (given the server's run_id, it returns the args) and await it."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((command, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_batches())
        return await future

    async def _send_batches(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                async with asyncio.timeout(self._timeout):
                    await self._send(batch)
            except (RedisError, OSError, TimeoutError) as exc:
                await self._drop_connection()
                _fail(batch, exc)
            except BaseException as exc:
                await self._drop_connection()
                _fail(batch, RedisError(f"check pipeline failed: {exc!r}"))
                raise

    async def _send(self, batch: Sequence[Pending]) -> None:
        connection = await self._connected()
        commands = [make(self._run_id) for make, _ in batch]
        await connection.send_packed_command(connection.pack_commands(commands), False)
        retry: list[Pending] = []
        for pending in batch:
            future = pending[1]
            try:
                reply = await connection.read_response(timeout=math.inf)
            except NoScriptError:
                retry.append(pending)
                continue
            except RedisError as exc:  # an error reply: the connection is still in step
                if not future.done():
                    future.set_exception(exc)
                continue
            if not future.done():
                future.set_result(reply)
        if retry:
            await connection.send_command("SCRIPT", "LOAD", self._script, check_health=False)
            await connection.read_response(timeout=math.inf)
            self._queue[:0] = retry

    async def _connected(self) -> Any:
        if self._connection is None:
            connection = self._pool.make_connection()  # type: ignore[no-untyped-call]
            await connection.connect()
            await connection.send_command("INFO", "server", check_health=False)
            self._run_id = self._read_run_id(await connection.read_response(timeout=math.inf))
            await connection.send_command("SCRIPT", "LOAD", self._script, check_health=False)
            await connection.read_response(timeout=math.inf)
            self._connection = connection
        return self._connection

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.disconnect(nowait=True)

    async def close(self) -> None:
        """Close the connection, from whichever loop calls (it is owned by its own)."""
        loop = self._loop
        if loop.is_closed() or self._pid != os.getpid():
            return
        if loop is asyncio.get_running_loop():
            await self._drop_connection()
        elif loop.is_running():
            done = asyncio.run_coroutine_threadsafe(self._drop_connection(), loop)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.wrap_future(done), self._timeout)


def _fail(batch: Sequence[Pending], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)

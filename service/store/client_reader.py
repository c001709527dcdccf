"""Client lookups on the server's event loop, over a few asyncpg connections of its own.

The app's engine belongs to the app's loop thread: reaching it from the server's loop
costs two thread hops and SQLAlchemy's work per statement, several times the query
itself. These connections serve this one read, on the loop that opened them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import asyncpg
from sqlalchemy.engine import make_url

from service.config import Settings
from service.store.db import bounds, database_url

# A lookup takes well under a millisecond: a few connections serve all of a worker's.
CONNECTIONS = 4
CLOSE_SECONDS = 5.0
QUERY = (
    "SELECT client_id, name, secret_hash, redirect_uris, grant_types, scope, auth_method,"
    " resource_server FROM oauth_clients WHERE client_id = ANY($1::varchar[])"
)


def connect_args(settings: Settings) -> dict[str, Any] | None:
    """asyncpg's arguments for DATABASE_URL, as SQLAlchemy derives them, with the same bounds.

    None if the database is not PostgreSQL.
    """
    url = make_url(database_url(settings))
    if url.get_backend_name() != "postgresql":
        return None
    args = dict(url.get_dialect()().create_connect_args(url)[1])
    args.pop("prepared_statement_name_func", None)
    args.pop("async_creator_fn", None)
    if "prepared_statement_cache_size" in args:
        args["statement_cache_size"] = args.pop("prepared_statement_cache_size")
    args.update(bounds(settings))
    return args


class ClientRecord(NamedTuple):
    """A stored client, with the attributes of its ORM row."""

    client_id: str
    name: str
    secret_hash: str | None
    redirect_uris: list[str]
    grant_types: list[str]
    scope: str
    auth_method: str
    resource_server: bool


class ClientReader:
    """Reads clients by id on the first event loop that asks; other loops get None."""

    def __init__(self, args: dict[str, Any], *, pool_timeout: float | None = None) -> None:
        self._args = args
        # Acquiring may open a connection: the wait for a free one, then the connect bound.
        self._acquire_timeout = (
            None if pool_timeout is None else pool_timeout + float(args.get("timeout", 0))
        )
        self._pool: asyncpg.Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening = asyncio.Lock()

    async def find(self, client_ids: Sequence[str]) -> dict[str, ClientRecord | None] | None:
        """The clients with these ids (None for an unknown one); None on another loop."""
        pool = await self._connections()
        if pool is None:
            return None
        found: dict[str, ClientRecord | None] = dict.fromkeys(client_ids)
        async with pool.acquire(timeout=self._acquire_timeout) as connection:
            try:
                records = await connection.fetch(QUERY, list(client_ids))
            except (TimeoutError, asyncio.CancelledError):
                # Its reply may still come: never hand this connection out again.
                connection.terminate()
                raise
        for record in records:
            found[record["client_id"]] = _client(record)
        return found

    async def _connections(self) -> asyncpg.Pool | None:
        loop = asyncio.get_running_loop()
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    # No connection yet: they open on first use, and close when idle.
                    self._pool = await asyncpg.create_pool(
                        min_size=0, max_size=CONNECTIONS, reset=_keep_session, **self._args
                    )
                    self._loop = loop
        return self._pool if loop is self._loop else None

    async def close(self) -> None:
        """Close the connections, from the loop that opened them."""
        pool = self._pool
        if pool is None or asyncio.get_running_loop() is not self._loop:
            return
        self._pool = None
        try:
            await asyncio.wait_for(pool.close(), CLOSE_SECONDS)
        except TimeoutError:
            pool.terminate()


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """Nothing to reset between lookups: a plain SELECT changes no session state.

    asyncpg's default reset is one more round trip (RESET ALL, UNLISTEN *, ...) per lookup.
    """


def _client(record: asyncpg.Record) -> ClientRecord:
    return ClientRecord(
        client_id=record["client_id"],
        name=record["name"],
        secret_hash=record["secret_hash"],
        redirect_uris=list(json.loads(record["redirect_uris"])),
        grant_types=list(json.loads(record["grant_types"])),
        scope=record["scope"],
        auth_method=record["auth_method"],
        resource_server=bool(record["resource_server"]),
    )

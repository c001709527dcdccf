"""Where REDIS_URL points: one server, or a primary that Redis Sentinel names.

    redis://[user:password@]host:6379/0              one server (also rediss://, unix://)
    redis+sentinel://[user:password@]host:26379[,host:26380...]/mymaster[/0]
                                                     the primary the sentinels name mymaster
                                                     (rediss+sentinel://: TLS to the primary)

Every client the service makes (the blocklist's pool, the revocation feed, the failure
counters) comes from `connect`, so each follows a failover the same way: redis-py's
Sentinel client asks the sentinels for the primary whenever a connection is made, and a
connection to a primary that was demoted fails (ReadOnlyError becomes ConnectionError).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aredis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
DEFAULT_SENTINEL_PORT = 26379


class Topology(StrEnum):
    """How the Redis behind REDIS_URL is deployed."""

    SINGLE = "single"
    SENTINEL = "sentinel"


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed REDIS_URL."""

    url: str = field(repr=False)  # it may hold a password
    topology: Topology
    nodes: tuple[tuple[str, int], ...] = ()
    service_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False


def parse_target(url: str) -> RedisTarget:
    """Read REDIS_URL; raises ValueError (never echoing a password) when it is not usable."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SENTINEL_SCHEMES:
        from redis.connection import parse_url

        parse_url(url)  # type: ignore[no-untyped-call]
        parts = urlsplit(url)
        database = parts.path.lstrip("/")
        if parts.scheme in {"redis", "rediss"} and database and not database.isdigit():
            raise ValueError(f"it names database {database!r}: it must be a number")
        return RedisTarget(url=url, topology=Topology.SINGLE)
    rest = url.split("://", 1)[1]
    authority, _, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(_host_port(entry) for entry in hosts.split(",") if entry.strip())
    if not nodes:
        raise ValueError("it names no sentinel (host:port, comma separated)")
    service, _, database = path.partition("/")
    service = unquote(service.split("?", 1)[0])
    database = database.split("?", 1)[0].strip("/")
    if not service:
        raise ValueError("it names no primary: redis+sentinel://host:26379/<master name>[/db]")
    if database and not database.isdigit():
        raise ValueError(f"it names database {database!r}: it must be a number")
    return RedisTarget(
        url=url,
        topology=Topology.SENTINEL,
        nodes=nodes,
        service_name=service,
        db=int(database or 0),
        username=username,
        password=password,
        ssl=SENTINEL_SCHEMES[scheme],
    )


def _host_port(entry: str) -> tuple[str, int]:
    """host:port, [v6]:port or host alone (the sentinel's default port)."""
    entry = entry.strip()
    if entry.startswith("["):
        host, _, port = entry[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = entry.partition(":")
    if not host or (port and not port.isdigit()) or not 0 < int(port or 1) < 65536:
        raise ValueError(f"sentinel {entry!r} is not host:port")
    return host, int(port or DEFAULT_SENTINEL_PORT)


class BlockingSentinelConnectionPool(SentinelConnectionPool, aredis.BlockingConnectionPool):
    """A Sentinel-managed pool that waits for a free connection, as the single-node pool does."""


class PrimaryClient(aredis.Redis):
    """A client of the Sentinel-named primary that also closes its connections to the sentinels."""

    manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the primary's pool, then the sentinels' own clients."""
        await super().aclose(close_connection_pool)
        if self.manager is not None:
            for client in self.manager.sentinels:
                await client.aclose()


def connect(
    target: RedisTarget,
    *,
    timeout: float,
    max_connections: int | None = None,
    blocking: bool = False,
    **options: Any,
) -> aredis.Redis:
    """A client of the target's (primary) server; options go to every connection.

    With blocking, past max_connections a call waits (up to timeout) for a free
    connection instead of failing at once.
    """
    options = {"socket_timeout": timeout, "socket_connect_timeout": timeout, **options}
    if max_connections is not None:
        options["max_connections"] = max_connections
    if target.topology is Topology.SINGLE:
        if blocking:
            pool = aredis.BlockingConnectionPool.from_url(target.url, timeout=timeout, **options)
            return aredis.Redis.from_pool(pool)
        return aredis.Redis.from_url(target.url, **options)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.nodes),
        # The sentinels are asked with the same bounds, without the primary's credentials.
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
    )
    if blocking:
        options["timeout"] = timeout
    client = sentinel.master_for(
        target.service_name,
        redis_class=PrimaryClient,
        connection_pool_class=BlockingSentinelConnectionPool
        if blocking
        else SentinelConnectionPool,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.ssl,
        **options,
    )
    assert isinstance(client, PrimaryClient)
    client.manager = sentinel
    return client

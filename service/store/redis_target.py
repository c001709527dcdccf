"""Where REDIS_URL points: one server, a primary that Redis Sentinel names, or a Cluster.

    redis://[user:password@]host:6379/0              one server (also rediss://, unix://)
    redis+sentinel://[user:password@]host:26379[,host:26380...]/mymaster[/0]
                                                     the primary the sentinels name mymaster
                                                     (rediss+sentinel://: TLS to the primary)
    redis+cluster://[user:password@]host:7000[,host:7001...]/
                                                     a Redis Cluster reached through any of
                                                     these nodes (rediss+cluster://: TLS)

Every client the service makes (the blocklist's pool, the revocation feed, the failure
counters) comes from `connect`, so each follows a failover the same way: redis-py's
Sentinel client asks the sentinels for the primary whenever a connection is made, and a
connection to a primary that was demoted fails (ReadOnlyError becomes ConnectionError).
A Cluster client (redis-py's RedisCluster) learns the slots from the nodes named and
follows MOVED answers and failovers itself; every command goes to the primary of its
keys' slot, never a replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
DEFAULT_PORTS = {"sentinel": 26379, "node": 6379}


class Topology(StrEnum):
    """How the Redis behind REDIS_URL is deployed."""

    SINGLE = "single"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


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
    if scheme in CLUSTER_SCHEMES:
        return _parse_cluster(url, ssl=CLUSTER_SCHEMES[scheme])
    if scheme not in SENTINEL_SCHEMES:
        from redis.connection import parse_url

        parse_url(url)  # type: ignore[no-untyped-call]
        parts = urlsplit(url)
        database = parts.path.lstrip("/")
        if parts.scheme in {"redis", "rediss"} and database and not database.isdigit():
            raise ValueError(f"it names database {database!r}: it must be a number")
        return RedisTarget(url=url, topology=Topology.SINGLE)
    username, password, nodes, path = _split_authority(url, "sentinel")
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


def _parse_cluster(url: str, *, ssl: bool) -> RedisTarget:
    """redis+cluster://[user:password@]host:port[,host:port...]/ (database 0 only)."""
    username, password, nodes, path = _split_authority(url, "node")
    database = path.split("?", 1)[0].strip("/")
    if database not in ("", "0"):
        raise ValueError("a Redis Cluster has database 0 only: redis+cluster://host:port/")
    return RedisTarget(
        url=url,
        topology=Topology.CLUSTER,
        nodes=nodes,
        username=username,
        password=password,
        ssl=ssl,
    )


def _split_authority(
    url: str, role: str
) -> tuple[str | None, str | None, tuple[tuple[str, int], ...], str]:
    """Credentials, host:port list and path of a URL naming several servers."""
    rest = url.split("://", 1)[1]
    authority, _, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(_host_port(entry, role) for entry in hosts.split(",") if entry.strip())
    if not nodes:
        raise ValueError(f"it names no {role} (host:port, comma separated)")
    return username, password, nodes, path


def _host_port(entry: str, role: str) -> tuple[str, int]:
    """host:port, [v6]:port or host alone (the role's default port)."""
    entry = entry.strip()
    if entry.startswith("["):
        host, _, port = entry[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = entry.partition(":")
    if not host or (port and not port.isdigit()) or not 0 < int(port or 1) < 65536:
        raise ValueError(f"{role} {entry!r} is not host:port")
    return host, int(port or DEFAULT_PORTS[role])


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
    if target.topology is Topology.CLUSTER:
        # The calls the throttle and the feed make (scripts, PUBLISH, aclose) are the
        # same on both clients; the blocklist uses connect_cluster and the cluster's own.
        return cast(aredis.Redis, connect_cluster(target, timeout=timeout, **options))
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


# Options a single server's connection takes that a RedisCluster names otherwise or not.
CLUSTER_IGNORED = {"timeout", "redis_connect_func"}


def connect_cluster(target: RedisTarget, *, timeout: float, **options: Any) -> RedisCluster:
    """A RedisCluster client; a redis_connect_func runs on every connection to every node.

    Past max_connections (per node) a call fails at once rather than waiting: RedisCluster
    has no blocking pool.
    """
    options = {"socket_timeout": timeout, "socket_connect_timeout": timeout, **options}
    on_connect = options.get("redis_connect_func")
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        ssl=target.ssl,
        **{key: value for key, value in options.items() if key not in CLUSTER_IGNORED},
    )
    if on_connect is not None:
        # RedisCluster takes no connect hook, but hands its connection options to every
        # node it learns of (the shared dict) and to the nodes it starts from (copies).
        client.connection_kwargs["redis_connect_func"] = on_connect
        for node in client.startup_nodes:
            node.connection_kwargs["redis_connect_func"] = on_connect
    return client


def node_name(connection: AbstractConnection) -> str:
    """The name RedisCluster gives the node a connection leads to (host:port)."""
    host = getattr(connection, "host", "")
    return f"{host}:{getattr(connection, 'port', '')}"

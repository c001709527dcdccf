"""Verdicts kept on a Redis Cluster: one sharded subscription per primary, probed on its own.

The argument of revocation_feed.py holds per node. A write to group g publishes
(SPUBLISH, in the same MULTI/EXEC) on `<prefix>{g}revoked`, which only the node holding
g's slot delivers, to the connections subscribed (SSUBSCRIBE) to it there. Each worker
keeps one such connection per primary, subscribed to the channels of the groups that
primary holds, and pings it; a kept verdict of group g is reused only while the
connection that confirmed g's channel has answered a PING sent less than the window ago.
Redis answers on one connection in order, so that answer proves every message the node
published before it was read. A writer returns the window after its write (there are no
acknowledgements here: they only ever shortened the wait).

A node's connection that fails, stalls, is told its slot moved (sunsubscribe), or
confirms a subscription forgets everything it kept; where no connection to a group's
node is subscribed, that group's checks ask Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any

import redis.asyncio as aredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException

from service.store.groups import GROUPS
from service.store.redis_target import RedisTarget
from service.store.revocation_feed import (
    IDLE_AFTER,
    RECONNECT_DELAY,
    Revocable,
    RevocationFeed,
    clock,
    parse_message,
)

log = logging.getLogger(__name__)

RESUBSCRIBE_AFTER = 1.0  # seconds between resubscriptions for a group a node took over


class SlotMoved(ConnectionError):
    """A node no longer holds the slot of a channel this connection subscribed to."""


class NodeFeed(RevocationFeed):
    """The subscription to one primary: the channels of the groups whose slots it holds."""

    def __init__(
        self,
        client: aredis.Redis,
        *,
        channels: Callable[[], dict[bytes, int]],
        on_group_seq: Callable[[int, int], object],
        window: float,
        timeout: float,
        size: int,
    ) -> None:
        super().__init__(
            client,
            channel="",
            window=window,
            timeout=timeout,
            size=size,
            on_seq=lambda seq: None,
        )
        self._channels = channels
        self._on_group_seq = on_group_seq
        self._wanted: dict[bytes, int] = {}
        self.groups: frozenset[int] = frozenset()
        self.started_at = -math.inf
        self._again = False

    def resubscribe(self) -> None:
        """Subscribe afresh (the node took a group over); the reading task does it."""
        self._again = True

    def holds(self, group: int) -> bool:
        """Whether this connection confirmed the group's channel and still listens to it."""
        return self.subscribed and group in self.groups

    async def _run(self) -> None:
        """Subscribe, and again whenever the subscription fails, until lookups stop."""
        while clock() - self.cache.last_lookup < IDLE_AFTER:
            self.started_at = clock()
            pubsub = self.subscription = self._client.pubsub()
            try:
                await asyncio.wait_for(self._subscribe(pubsub), self._timeout)
                self.subscribed = True
                await self._read(pubsub)
            except Exception as exc:  # any failure: forget, and subscribe again
                log.warning("revocation feed of a node unavailable: %s", type(exc).__name__)
            finally:
                self.subscribed = False
                self.groups = frozenset()
                self._forget()
                self.subscription = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(RECONNECT_DELAY)

    async def _subscribe(self, pubsub: PubSub) -> None:
        """SSUBSCRIBE each group's channel (one slot each) and wait until Redis confirmed all."""
        self._wanted = self._channels()
        if not self._wanted:
            raise SlotMoved("this node holds no group's slot")
        for channel in self._wanted:
            await pubsub.ssubscribe(channel)
        confirmed = 0
        while confirmed < len(self._wanted):
            reply = await pubsub.get_message(timeout=self._timeout)
            if reply is not None:
                self._handle(reply)
                if reply["type"] == "ssubscribe":
                    confirmed += 1
        self.groups = frozenset(self._wanted.values())

    def _handle(self, reply: dict[str, Any]) -> None:
        if self._again:
            self._again = False
            raise SlotMoved("a group's slot came to this node")
        kind = reply["type"]
        if kind == "smessage":
            parsed = parse_message(reply["data"])
            if parsed is None or parsed[0] is None:
                self.cache.reset()
            else:
                self.cache.drop(parsed[0])
            group = self._wanted.get(reply["channel"])
            if parsed is not None and group is not None:
                self._on_group_seq(group, parsed[1])
        elif kind == "sunsubscribe":
            # The slot moved to another node: messages of its group now go there.
            self._forget()
            raise SlotMoved("a group's slot left this node")
        elif kind == "ssubscribe":
            self._forget()
        else:
            super()._handle(reply)


class ClusterFeed:
    """Every primary's NodeFeed of one worker, and which one speaks for each group."""

    def __init__(
        self,
        cluster: RedisCluster,
        target: RedisTarget,
        *,
        channel: Callable[[int], str],
        on_group_seq: Callable[[int, int], object],
        window: float,
        timeout: float,
        size: int,
    ) -> None:
        self.window = window
        self._cluster = cluster
        self._target = target
        self._channel = channel
        self._on_group_seq = on_group_seq
        self._timeout = timeout
        self._size = size
        self._nodes: dict[str, NodeFeed] = {}

    def _node_of(self, group: int) -> str:
        node = self._cluster.get_node_from_key(self._channel(group))
        return "" if node is None else node.name

    def feed_of(self, group: int) -> NodeFeed | None:
        """The connection that speaks for the group now, started if idle; None if none does."""
        try:
            name = self._node_of(group)
        except RedisClusterException:
            return None
        if not name:
            return None
        feed = self._nodes.get(name)
        if feed is None:
            feed = self._nodes[name] = self._make(name)
        if feed.subscribed and group not in feed.groups:
            # The node took the group over after this connection subscribed: subscribe
            # again (not more than once a second), and ask Redis meanwhile.
            if clock() - feed.started_at > RESUBSCRIBE_AFTER:
                feed.resubscribe()
            return None
        return feed

    def lookup(self, group: int, ref: Revocable) -> tuple[NodeFeed | None, int | None]:
        """The feed of ref's group and a verdict kept there that is safe to reuse, if any."""
        feed = self.feed_of(group)
        if feed is None:
            return None, None
        kept = feed.lookup(ref)  # also keeps the subscription alive
        if not feed.holds(group):
            return feed, None
        return feed, kept

    def _make(self, name: str) -> NodeFeed:
        host, _, port = name.rpartition(":")
        client = aredis.Redis(
            host=host,
            port=int(port),
            username=self._target.username,
            password=self._target.password,
            ssl=self._target.ssl,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            # Never retried behind the feed's back: a lost subscription must show at once.
            retry=Retry(NoBackoff(), 0),
        )

        def channels() -> dict[bytes, int]:
            held = {}
            for group in range(GROUPS):
                with contextlib.suppress(RedisClusterException):
                    if self._node_of(group) == name:
                        held[self._channel(group).encode()] = group
            return held

        return NodeFeed(
            client,
            channels=channels,
            on_group_seq=self._on_group_seq,
            window=self.window,
            timeout=self._timeout,
            size=self._size,
        )

    async def close(self) -> None:
        """Stop every node's subscription."""
        for feed in self._nodes.values():
            await feed.close()
        self._nodes.clear()

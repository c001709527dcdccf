"""Verdicts kept on a Redis Cluster: one sharded subscription per primary, probed on its own.

The argument of revocation_feed.py holds per node. A write to group g publishes
(SPUBLISH, in the same MULTI/EXEC) on `<prefix>{g}revoked`, which only the node holding
g's slot delivers, to the connections subscribed (SSUBSCRIBE) to it there. Each worker
keeps one such connection per primary, subscribed to the channels of the groups that
primary holds, and pings it; a kept verdict of group g is reused only while the
connection that confirmed g's channel has answered a PING sent less than the window ago.
Redis answers on one connection in order, so that answer proves every message the node
published before it was read.

Acknowledgements work as on one server, per node: each connection also subscribes to an
acknowledgement channel of its own on its node (under the tag of one of that node's
groups, so in one of its slots), a writer names it in its announcement, and every
connection that reads the announcement SPUBLISHes the writer's receipt id there. SPUBLISH
tells the writer how many connections of g's node got the announcement; the writer
returns once that many have acknowledged, or the window after its write.

A node's connection that fails, stalls, is told its slot moved (sunsubscribe), or
confirms a subscription forgets everything it kept; where no connection to a group's
node is subscribed, that group's checks ask Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
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
    Receipt,
    RevocationFeed,
    clock,
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
        self._ack_id = os.urandom(8).hex()
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
                self._ready.set()
                await self._read(pubsub)
            except Exception as exc:  # any failure: forget, and subscribe again
                log.warning("revocation feed of a node unavailable: %s", type(exc).__name__)
            finally:
                self.subscribed = False
                self._ready.clear()
                self.groups = frozenset()
                self._forget()
                self.subscription = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(RECONNECT_DELAY)

    async def _subscribe(self, pubsub: PubSub) -> None:
        """SSUBSCRIBE each group's channel (one slot each) and the acknowledgement channel.

        Waits until Redis confirmed all of them.
        """
        self._wanted = self._channels()
        if not self._wanted:
            raise SlotMoved("this node holds no group's slot")
        # In the slot of one of this node's groups: the node that delivers the
        # announcements of its groups is the one their readers acknowledge on.
        first = min(self._wanted, key=self._wanted.__getitem__)
        self._acks = f"{first.decode()}:acks:{self._ack_id}"
        for channel in [*self._wanted, self._acks.encode()]:
            await pubsub.ssubscribe(channel)
        confirmed = 0
        while confirmed < len(self._wanted) + 1:
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
        if kind == "smessage" and reply["channel"] == self._acks.encode():
            receipt = self._receipts.get(reply["data"].decode(errors="replace"))
            if receipt is not None:
                receipt.acknowledged()
        elif kind == "smessage":
            parsed = self._apply(reply["data"])
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

    async def _acknowledge(self, channel: str, receipt_id: str) -> None:
        # On this connection's node, which holds the channel's slot (else Redis refuses,
        # and the writer waits out its window).
        await self._client.spublish(channel, receipt_id)


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

    @property
    def started(self) -> bool:
        """Whether this process ever looked a verdict up (it serves checks)."""
        return any(feed.started for feed in self._nodes.values())

    async def subscribe(self, groups: Iterable[int]) -> None:
        """Have the connections of these groups' nodes subscribed, waiting up to half a window.

        Only in a process that serves checks: a writer that never checks (a command) has
        no subscription to hear acknowledgements on, and waits the window instead.
        """
        if not self.started:
            return
        waits = set()
        for group in groups:
            feed = self.feed_of(group)
            if feed is not None and not feed.holds(group):
                waits.add(feed)
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(feed.subscribe() for feed in waits)), self.window / 2
                )

    @contextlib.contextmanager
    def receipt(self, group: int) -> Iterator[Receipt | None]:
        """A receipt for a write to group, on the connection to its node (None: none holds it)."""
        feed = self.feed_of(group)
        if feed is None or not feed.holds(group):
            yield None
            return
        # A write counts as use: a subscription that went idle while a write to many
        # groups is under way could not hear their acknowledgements.
        feed.cache.last_lookup = clock()
        with feed.receipt() as receipt:
            yield receipt

    def lookup(self, group: int, ref: object) -> tuple[NodeFeed | None, Any]:
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

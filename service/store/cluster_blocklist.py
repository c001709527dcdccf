"""The revocation blocklist on a Redis Cluster: the single-server layout, once per group.

Users fall into groups (service/store/groups.py); each group has the whole layout of
blocklist.py under its own hash tag, so every key one check reads, and every key one
write changes, sits in one slot:

  {tag}ready, {tag}seq, {tag}rebuild-lock
  {tag}r:<bucket>:<shard>, {tag}s:<bucket>:<shard>, {tag}u:<user id>

A group's ready names the run_id of the node that holds its slot: a failover of one
shard makes its groups answer NOT_LOADED until they are reloaded, while the other groups
answer on. Each worker keeps a floor per group. Every write publishes what it covers on
its group's channel {tag}revoked (SPUBLISH, in the write's transaction), and verdicts are
kept per primary as cluster_feed.py explains.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterable, Iterable, Sequence
from typing import Any

import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import metrics
from service.store.blocklist import (
    BREAKER_SECONDS,
    CHECK_SCRIPT,
    EXTEND_LOCK_SCRIPT,
    LOAD_BATCH,
    RAISE_CUTOFF_SCRIPT,
    RAISE_SEQ_SCRIPT,
    REBUILD_LOCK_SECONDS,
    BlocklistUnavailable,
    Entry,
    Kind,
    Recalled,
    RedisBlocklist,
    State,
    TokenRef,
    Verdict,
    _subject,
    keep_nothing,
    parse_run_id,
    release_locks,
    session_started_ms,
)
from service.store.cluster_feed import ClusterFeed
from service.store.groups import GROUPS, group_of, group_tags
from service.store.redis_target import connect_cluster, node_name
from service.store.revocation_feed import Receipt, RevocationFeed, Subject, message

# What a cluster client raises when it cannot answer (a slot not covered is not a RedisError).
# AttributeError too: the client closes every node's connections on CLUSTERDOWN, and so
# do we on a failure (_unreachable), also those a command is using, which then fails on a
# connection whose socket is gone (`'NoneType' object has no attribute 'writelines'`).
FAILURES = (RedisError, RedisClusterException, AttributeError)

# FINISH_LOAD_SCRIPT for one group: its announcement goes on the group's own channel.
FINISH_GROUP_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
if tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[3]) then
  redis.call('SET', KEYS[3], ARGV[3])
end
redis.call('DEL', KEYS[1])
redis.call('SPUBLISH', KEYS[4], ARGV[4])
return 1
"""

# The channel is passed as a key so that the client sends it to the node of its slot.
ANNOUNCE_SCRIPT = "return redis.call('SPUBLISH', KEYS[1], ARGV[1])"


class ClusterBlocklist(RedisBlocklist):
    """Blocklist on a Redis Cluster, its keys grouped by user; one RedisCluster per worker."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._tags = group_tags()
        self._floors = [0] * GROUPS
        self._run_ids: dict[str, str] = {}
        # A breaker per node: checks of groups whose node just failed answer 503 at once,
        # and those of the other nodes' groups go on (the inherited breaker is for a
        # client that cannot reach the cluster at all).
        self._nodes_down: dict[str, float] = {}
        self._cluster: RedisCluster | None = None
        self._script: AsyncScript | None = None
        self._feeds: ClusterFeed | None = None

    def key(self, group: int, name: str) -> str:
        """A key of the group's layout."""
        return f"{self._prefix}{{{self._tags[group]}}}{name}"

    def group_bucket_key(self, group: int, kind: Kind, subject: str, expires_at: int) -> str:
        """The hash of the group that holds subject (see RedisBlocklist.bucket_key)."""
        return self.key(group, self.bucket_key(kind, subject, expires_at)[len(self._prefix) :])

    def _groups_of(self, entry: Entry) -> Sequence[int]:
        """The groups an entry goes to: its user's, or every group when the user is unknown."""
        owner = entry.owner
        return range(GROUPS) if owner is None else (group_of(owner),)

    async def _client(self) -> RedisCluster:
        """The cluster client, made on first use and knowing the slots."""
        if self._cluster is None:
            self._cluster = connect_cluster(
                self._target,
                timeout=self._timeout,
                max_connections=self._max_connections,
                health_check_interval=30,
                redis_connect_func=self._on_node_connect,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
            self._script = self._cluster.register_script(CHECK_SCRIPT)
        client = self._cluster
        try:
            await client.initialize()
        except FAILURES as exc:
            # Relearning the layout asks the first primary the client knows: when that is
            # the one down, relearn it from the next before calling the cluster unreachable.
            first = client.get_primaries()[:1]
            if not first:
                raise self._unreachable(exc) from exc
            self._set_aside(client, first[0].name)
            try:
                await client.initialize()
            except FAILURES as again:
                raise self._unreachable(again) from again
        return client

    async def _on_node_connect(self, connection: aredis.connection.AbstractConnection) -> None:
        """Learn each node's run_id on every new connection to it: a restart shows up here."""
        await connection.on_connect()
        await connection.send_command("INFO", "server")
        self._run_ids[node_name(connection)] = _run_id(await connection.read_response())

    def _unreachable(self, exc: Exception, node: str | None = None) -> BlocklistUnavailable:
        """Open the breaker of the node that failed (None: of every node), and start afresh.

        As on one server, its connections are closed rather than left to fail once each.
        """
        metrics.redis_error("check")
        if self._cluster is not None:
            loop = asyncio.get_running_loop()
            for each in self._cluster.get_nodes():
                if node in (None, each.name) and not self._down(each.name):
                    self._closing.add(loop.create_task(_disconnect(each)))
        until = time.monotonic() + BREAKER_SECONDS
        if node is None:
            self._down_until = until
        else:
            self._nodes_down[node] = until
            if self._cluster is not None:
                self._set_aside(self._cluster, node)
        return BlocklistUnavailable.because(exc)

    @staticmethod
    def _set_aside(client: RedisCluster, node: str) -> None:
        """Make a node that failed the last the client asks when it relearns the layout.

        The client asks the first primary it knows for its command table every time it
        relearns the layout (after any failure); were that the dead one, it could not
        relearn it, and every node's checks would fail until the failover. The client
        does this itself for a command that fails, not for a pipeline or a lookup.
        """
        move_to_end = getattr(client.nodes_manager, "move_node_to_end_of_cached_nodes", None)
        if move_to_end is not None:  # older redis-py has none: its own order stays
            move_to_end(node)

    def _down(self, node: str) -> bool:
        """Whether the node's breaker, or the whole client's, is open."""
        now = time.monotonic()
        return now < self._down_until or now < self._nodes_down.get(node, 0.0)

    def _current_feed(self) -> RevocationFeed | None:
        """Not the single-server feed: see _cluster_feed."""
        return None

    def _cluster_feed(self) -> ClusterFeed | None:
        """The per-primary subscriptions, unless verdicts are never kept (or no client yet)."""
        if not self._propagation or self._cluster is None:
            return None
        if self._feeds is None:
            self._feeds = ClusterFeed(
                self._cluster,
                self._target,
                channel=lambda group: self.key(group, "revoked"),
                on_group_seq=self.raise_group_floor,
                window=self._propagation,
                timeout=self._timeout,
                size=self._kept_verdicts,
            )
        return self._feeds

    def known(self, ref: TokenRef) -> Verdict | None:
        """The verdict kept since the last revocation that could change it, if any; no I/O."""
        feeds = self._cluster_feed()
        if feeds is None:
            return None
        _, kept = feeds.lookup(group_of(ref.sub), ref)
        return None if kept is None else Verdict(kept)

    def recall(self, subject: Subject) -> Recalled:
        """A value kept on the subscription to the node of the subject's group, and its keeper."""
        feeds = self._cluster_feed()
        group = group_of(subject[1])
        feed, kept = (None, None) if feeds is None else feeds.lookup(group, subject)
        if feed is None or not feed.holds(group):
            return None, keep_nothing
        cache, generation = feed.cache, feed.cache.generation
        return kept, lambda value: cache.keep_under(subject, value, generation, (subject,))

    async def check(self, ref: TokenRef) -> Verdict:
        """A verdict kept on the subscription to the group's node, else one EVALSHA."""
        group = group_of(ref.sub)
        feeds = self._cluster_feed()
        feed = None
        generation = 0
        if feeds is not None:
            feed, kept = feeds.lookup(group, ref)
            if kept is not None:
                return Verdict(kept)
            if feed is not None and feed.holds(group):
                generation = feed.cache.generation
            else:
                feed = None
        verdict = await self._ask(ref)
        if feed is not None and verdict is not Verdict.NOT_LOADED and feed.holds(group):
            feed.cache.keep(ref, verdict, generation, revocable=verdict is Verdict.VALID)
        return verdict

    # Floors, one per group.

    def floors(self) -> list[int]:
        """A copy of the floor of every group."""
        return list(self._floors)

    def raise_group_floor(self, group: int, seq: int | None) -> None:
        """Note that the group held seq."""
        if seq is not None and seq > self._floors[group]:
            self._floors[group] = seq

    @property
    def floor(self) -> int:
        """The lowest floor of any group (the per-group floors are what checks demand)."""
        return min(self._floors)

    def raise_floor(self, seq: int | None) -> None:
        """Note that every group held seq (a load of every group)."""
        for group in range(GROUPS):
            self.raise_group_floor(group, seq)

    # Checks.

    def check_keys(self, group: int, ref: TokenRef) -> list[str]:
        """The keys one check of ref reads, all in group's hash slot."""
        return [
            self.key(group, "ready"),
            self.group_bucket_key(group, Kind.TOKEN, ref.jti, ref.exp),
            self.group_bucket_key(group, Kind.SESSION, ref.sid, ref.sxp),
            self.key(group, f"u:{ref.sub}"),
            self.key(group, "seq"),
        ]

    async def _ask(self, ref: TokenRef) -> Verdict:
        """Run the check script on the node of the token's group, with that node's run_id."""
        self._refuse_if_down()
        client = await self._client()
        group = group_of(ref.sub)
        keys = self.check_keys(group, ref)
        args: list[str | int] = [ref.jti, ref.sid, session_started_ms(ref)]
        try:
            node = self._node_of(client, keys[0])
        except FAILURES as exc:  # no node holds the slot now: a lookup, nothing to wait out
            metrics.redis_error("check")
            raise BlocklistUnavailable.because(exc) from exc
        if self._down(node):
            # Recently unreachable: answer 503 at once instead of waiting out a timeout.
            raise BlocklistUnavailable("blocklist node unreachable moments ago")
        try:
            result = await self._run_check(client, group, keys, args, node)
        except RedisTimeoutError as exc:
            raise self._unreachable(exc, node) from exc
        except FAILURES:
            # The client drops every node's connections, also those in use, when it
            # relearns the layout (a failover or a move elsewhere in the cluster): a check
            # is a read, so it is asked once more before its node counts as down.
            try:
                result = await self._run_check(client, group, keys, args, node)
            except FAILURES as exc:
                raise self._unreachable(exc, node) from exc
        self._down_until = 0.0
        self._nodes_down.pop(node, None)
        return Verdict(int(result))

    async def _run_check(
        self, client: RedisCluster, group: int, keys: list[str], args: list[str | int], node: str
    ) -> Any:
        """The check script with the run_id of the node that holds the group's slot."""
        assert self._script is not None
        run_id = self._run_ids.get(node, "")
        result = await self._script(keys, [*args, run_id, self._floors[group]], client)
        answered = self._node_of(client, keys[0])
        if (answered, self._run_ids.get(answered, "")) != (node, run_id):
            # The call (re)connected, or followed the slot to another node: ask again
            # with the run_id of the node that holds the slot now.
            run_id = self._run_ids.get(answered, "")
            result = await self._script(keys, [*args, run_id, self._floors[group]], client)
        return result

    @staticmethod
    def _node_of(client: RedisCluster, key: str) -> str:
        node = client.get_node_from_key(key)
        return "" if node is None else node.name

    # Writes.

    async def add(self, entries: Iterable[Entry], *, seq: int | None = None) -> None:
        """Write revocations, one transaction per group; in force once this returns.

        Each transaction announces its entries on the group's channel. With kept verdicts,
        this returns once every subscription each announcement reached has acknowledged
        it, or at the latest the window after the last transaction, past which no worker
        trusts a verdict kept before it (see cluster_feed.py).
        """
        by_group: dict[int, list[Entry]] = defaultdict(list)
        for entry in entries:
            for group in self._groups_of(entry):
                by_group[group].append(entry)
        writes: dict[int, tuple[list[Entry], list[Subject]]] = {
            group: (found, [_subject(entry) for entry in found])
            for group, found in by_group.items()
        }
        await self._announced_groups(writes, seq)

    async def announce(self, subjects: Iterable[Subject]) -> None:
        """Announce a change no revocation records, on the channel of each subject's group."""
        by_group: dict[int, list[Subject]] = defaultdict(list)
        for subject in subjects:
            by_group[group_of(subject[1])].append(subject)
        writes: dict[int, tuple[list[Entry], list[Subject]]] = {
            group: ([], named) for group, named in by_group.items()
        }
        await self._announced_groups(writes, None)

    async def _announced_groups(
        self, writes: dict[int, tuple[list[Entry], list[Subject]]], seq: int | None
    ) -> None:
        """Write each group's entries announcing its subjects; return once acknowledged."""
        if not writes:
            return
        client = await self._client()
        feeds = self._cluster_feed()
        if feeds is None:
            for group, (entries, subjects) in writes.items():
                await self._write_group(client, group, entries, subjects, seq, None)
            return
        await feeds.subscribe(writes)
        with contextlib.ExitStack() as receipts:
            counted: list[tuple[Receipt, int]] = []
            for group, (entries, subjects) in writes.items():
                receipt = receipts.enter_context(feeds.receipt(group))
                readers = await self._write_group(client, group, entries, subjects, seq, receipt)
                if receipt is not None:
                    counted.append((receipt, readers))
            if len(counted) < len(writes):
                # A group's node this worker hears no acknowledgement from: the window.
                await asyncio.sleep(self._propagation)
                return
            waits = (receipt.all_of(readers) for receipt, readers in counted)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), self._propagation)

    async def _write_group(
        self,
        client: RedisCluster,
        group: int,
        entries: list[Entry],
        subjects: list[Subject],
        seq: int | None,
        receipt: Receipt | None,
    ) -> int:
        """One group's entries and seq in one transaction, announced; the readers reached."""
        try:
            async with client.pipeline(transaction=True) as pipe:
                self._queue_group(pipe, group, entries)
                if seq is not None:
                    pipe.eval(RAISE_SEQ_SCRIPT, 1, self.key(group, "seq"), seq)
                announcement = message(subjects, seq or 0, receipt)
                pipe.eval(ANNOUNCE_SCRIPT, 1, self.key(group, "revoked"), announcement)
                replies = await pipe.execute()
        except FAILURES as exc:
            raise BlocklistUnavailable.because(exc) from exc
        self.raise_group_floor(group, seq)
        return int(replies[-1])

    def _queue_group(self, pipe: ClusterPipeline, group: int, entries: list[Entry]) -> None:
        """Queue one group's entries: one HSET and EXPIREAT per bucket, a script per cutoff."""
        buckets: dict[str, tuple[dict[str, int], int]] = {}
        for entry in entries:
            if entry.kind is Kind.USER:
                assert entry.cutoff_ms is not None
                key = self.key(group, f"u:{entry.subject}")
                pipe.eval(RAISE_CUTOFF_SCRIPT, 1, key, entry.cutoff_ms, entry.expires_at)
                continue
            key = self.group_bucket_key(group, entry.kind, entry.subject, entry.expires_at)
            fields, _ = buckets.setdefault(key, ({}, self.bucket_end(entry.kind, entry.expires_at)))
            fields[entry.subject] = 1
        for key, (fields, end) in buckets.items():
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.expireat(key, end)

    # Loads, per group.

    async def rebuild(self, entries: AsyncIterable[Entry], *, seq: int = 0) -> bool:
        """Load every group (see rebuild_groups)."""
        seqs = dict.fromkeys(range(GROUPS), seq)
        return await self.rebuild_groups(entries, seqs) == set(seqs)

    async def rebuild_groups(self, entries: AsyncIterable[Entry], seqs: dict[int, int]) -> set[int]:
        """Load entries into the groups named, then mark each loaded with its seq.

        Entries of other groups are skipped. Returns the groups loaded: a group another
        process is loading, or one whose node lost the lock meanwhile, is left out.
        """
        client = await self._client()
        token = os.urandom(8).hex()
        order = sorted(seqs)
        try:
            try:
                return await self._load_groups(client, entries, seqs, order, token)
            except BaseException:
                # Finished groups' locks are gone already: the script deletes only token's.
                locks = [self.key(group, "rebuild-lock") for group in order]
                await release_locks(client, locks, token)
                raise
        except FAILURES as exc:
            raise BlocklistUnavailable.because(exc) from exc

    async def _load_groups(
        self,
        client: RedisCluster,
        entries: AsyncIterable[Entry],
        seqs: dict[int, int],
        order: list[int],
        token: str,
    ) -> set[int]:
        """rebuild_groups under token's locks: take them, load, finish each group."""
        async with client.pipeline(transaction=False) as pipe:
            for group in order:
                lock = self.key(group, "rebuild-lock")
                pipe.set(lock, token, nx=True, ex=REBUILD_LOCK_SECONDS)
            taken = await pipe.execute()
        held = {group for group, ours in zip(order, taken, strict=True) if ours}
        batch: list[Entry] = []
        async for entry in entries:
            batch.append(entry)
            if len(batch) >= LOAD_BATCH:
                held &= await self._load_batch(client, batch, held, token)
                batch = []
        held &= await self._load_batch(client, batch, held, token)
        done = set()
        run_ids: dict[str, str] = {}
        for group in sorted(held):
            node = client.get_node_from_key(self.key(group, "ready"))
            if node is None:
                continue
            if node.name not in run_ids:
                info = await client.execute_command("INFO", "server", target_nodes=node)
                run_ids[node.name] = _run_id(info)
            names = ("rebuild-lock", "ready", "seq", "revoked")
            keys = [self.key(group, name) for name in names]
            finish = (token, run_ids[node.name], seqs[group], message(None, seqs[group]))
            if await client.eval(FINISH_GROUP_SCRIPT, 4, *keys, *finish):
                done.add(group)
                self.raise_group_floor(group, seqs[group])
        return done

    async def _load_batch(
        self, client: RedisCluster, entries: list[Entry], held: set[int], token: str
    ) -> set[int]:
        """Write one batch into the held groups; returns the groups whose lock is still ours."""
        if not held:
            return held
        by_group: dict[int, list[Entry]] = defaultdict(list)
        for entry in entries:
            for group in self._groups_of(entry):
                if group in held:
                    by_group[group].append(entry)
        order = sorted(held)
        async with client.pipeline(transaction=False) as pipe:
            for group, group_entries in by_group.items():
                self._queue_group(pipe, group, group_entries)
            for group in order:
                lock = self.key(group, "rebuild-lock")
                pipe.eval(EXTEND_LOCK_SCRIPT, 1, lock, token, REBUILD_LOCK_SECONDS)
            replies = await pipe.execute()
        kept = replies[len(replies) - len(order) :]
        return {group for group, ours in zip(order, kept, strict=True) if ours}

    # What the groups say of themselves.

    async def group_states(self) -> list[State | None]:
        """Whether each group is loaded into the node holding its slot, and its seq.

        None for the groups of a node that does not answer: the others are read all the
        same, so that a failed shard does not hide the state of the rest.
        """
        client = await self._client()
        by_node: dict[str, list[int]] = defaultdict(list)
        for group in range(GROUPS):
            by_node[self._node_of(client, self.key(group, "ready"))].append(group)
        by_node.pop("", None)  # slots no node holds now
        states: list[State | None] = [None] * GROUPS
        # One node after another: a pipeline that fails makes the client drop every
        # node's connections, which would fail the reads of the others under way.
        for node, groups in by_node.items():
            try:
                answer = await self._node_states(client, node, groups)
            except FAILURES:
                self._set_aside(client, node)
                continue
            for group, state in zip(groups, answer, strict=True):
                states[group] = state
        if all(state is None for state in states):
            raise BlocklistUnavailable("blocklist unreachable: no node answered")
        return states

    async def _node_states(self, client: RedisCluster, node: str, groups: list[int]) -> list[State]:
        """The states of groups whose slots node holds (see group_states)."""
        async with client.pipeline(transaction=False) as pipe:
            for group in groups:
                pipe.get(self.key(group, "ready"))
                pipe.get(self.key(group, "seq"))
            values = await pipe.execute()
        target = client.get_node(node_name=node)
        if target is None:
            raise RedisClusterException(f"{node} left the cluster")
        run_id = _run_id(await client.execute_command("INFO", "server", target_nodes=target))
        states = []
        for index, group in enumerate(groups):
            ready, seq = values[2 * index], values[2 * index + 1]
            # A slot that moved meanwhile counts as not loaded: its group is reloaded.
            holder = self._node_of(client, self.key(group, "ready"))
            loaded = (
                bool(run_id)
                and holder == node
                and isinstance(ready, bytes)
                and ready.decode() == run_id
            )
            states.append(State(loaded=loaded, seq=int(seq or 0)))
        return states

    async def state(self) -> State:
        """Loaded when every group is; the lowest seq of any group."""
        states = await self.group_states()
        known = [state for state in states if state is not None]
        if len(known) < len(states):
            raise BlocklistUnavailable("blocklist unreachable: a node did not answer")
        return State(loaded=all(s.loaded for s in known), seq=min(s.seq for s in known))

    async def invalidate_groups(self, groups: Iterable[int]) -> None:
        """Drop the groups' loaded marks: their checks answer NOT_LOADED until reloaded."""
        client = await self._client()
        try:
            async with client.pipeline(transaction=False) as pipe:
                for group in groups:
                    pipe.delete(self.key(group, "ready"))
                await pipe.execute()
        except FAILURES as exc:
            raise BlocklistUnavailable.because(exc) from exc

    async def invalidate(self) -> None:
        """Drop every group's loaded mark."""
        await self.invalidate_groups(range(GROUPS))

    async def eviction_policy(self) -> str | None:
        """The first maxmemory-policy other than noeviction among the primaries, if any."""
        try:
            client = await self._client()
            for node in client.get_primaries():
                reply = await client.execute_command(
                    "CONFIG", "GET", "maxmemory-policy", target_nodes=node
                )
                policy = _config_value(reply)
                if policy != "noeviction":
                    return policy
        except (*FAILURES, BlocklistUnavailable):
            return None
        return "noeviction"

    async def close(self) -> None:
        """Stop the subscriptions and close the cluster client."""
        if self._feeds is not None:
            await self._feeds.close()
            self._feeds = None
        if self._cluster is not None:
            await self._cluster.aclose()
            self._cluster = None


def _run_id(info: object) -> str:
    """The run_id of an INFO server reply: raw, parsed, or keyed by node name."""
    if isinstance(info, dict) and "run_id" not in info and len(info) == 1:
        info = next(iter(info.values()))
    return parse_run_id(info)


def _config_value(reply: object) -> str | None:
    """The value of a CONFIG GET reply for one parameter, raw or parsed."""
    if isinstance(reply, dict):
        values = list(reply.values())
    elif isinstance(reply, list | tuple):
        values = list(reply[1::2])
    else:
        return None
    if not values:
        return None
    value = values[0]
    return value.decode() if isinstance(value, bytes) else str(value)


async def _disconnect(node: Any) -> None:
    with contextlib.suppress(*FAILURES, OSError):
        await node.disconnect()

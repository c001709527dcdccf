"""The revocation blocklist: at most one Redis round trip per check, memory bounded by expiry.

Layout under the configured prefix:
  ready                   the run_id of the Redis process the blocklist was loaded into: a
                          restart (even from a snapshot) or a failover changes the run_id,
                          so a blocklist that may have lost entries is reloaded first
  seq                     the highest number (revocations.seq in PostgreSQL) of a write it
                          holds: a Redis that went back to an older copy of its data shows
                          a lower one than a worker has seen, or than PostgreSQL records
  rebuild-lock            held by the one process reloading the blocklist
  r:<bucket>:<shard>      hash of revoked token ids (jti) whose tokens expire in that minute;
  s:<bucket>:<shard>      hash of revoked session ids (sid) whose sessions end in that hour:
                          an hour's grace on a 30-day session keeps the hashes dense;
                          small hashes stay listpack-encoded, about 40 bytes per id
  u:<user id>             sessions of that user started at or before this millisecond are revoked
  revoked                 channel: every write names what it covers, so that workers can keep
                          verdicts until one changes (see revocation_feed.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import zlib
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, NamedTuple, Protocol

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from service import metrics
from service.ids import issued_millis
from service.store import revocation_feed as feed
from service.store.redis_target import connect, parse_target
from service.store.revocation_feed import Receipt, RevocationFeed, Subject, message

CHECK_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[4] then return 2 end
if tonumber(redis.call('GET', KEYS[5]) or '0') < tonumber(ARGV[5]) then return 2 end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 1 end
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then return 1 end
local cutoff = redis.call('GET', KEYS[4])
if cutoff and tonumber(cutoff) >= tonumber(ARGV[3]) then return 1 end
return 0
"""

RAISE_CUTOFF_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if (not current) or tonumber(current) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EXAT', ARGV[2])
elseif redis.call('EXPIRETIME', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('EXPIREAT', KEYS[1], ARGV[2])
end
return 1
"""

RAISE_SEQ_SCRIPT = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""

# Whoever still holds the lock marks the blocklist loaded and tells every worker to drop
# its kept verdicts (the load may change any); a Redis that restarted during the load has
# lost the lock (and what was loaded), and the load starts over.
FINISH_LOAD_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
if tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[3]) then
  redis.call('SET', KEYS[3], ARGV[3])
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

EXTEND_LOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""

# A load that failed gives its lock back, so that the next recovery (any process's) need
# not wait REBUILD_LOCK_SECONDS for it to expire; only the holder's token releases it.
RELEASE_LOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""

LOAD_BATCH = 5000
REBUILD_LOCK_SECONDS = 30
BREAKER_SECONDS = 0.5


class BlocklistUnavailable(RuntimeError):
    """The blocklist cannot answer (Redis unreachable or not yet rebuilt): fail closed."""

    @classmethod
    def because(cls, exc: BaseException) -> BlocklistUnavailable:
        """The error for a failed call to Redis, naming only the failure's type."""
        return cls(f"blocklist unreachable: {type(exc).__name__}")


class Verdict(IntEnum):
    """Result of a check, as the check script returns it."""

    VALID = 0
    REVOKED = 1
    NOT_LOADED = 2


class Kind(StrEnum):
    """What a revocation covers."""

    TOKEN = "token"  # noqa: S105 - one token, by jti
    SESSION = "session"  # every token of one login or grant, by sid
    USER = "user"  # every session of a user started at or before cutoff_ms


@dataclass(frozen=True, slots=True)
class Entry:
    """One revocation; expires_at is when every token it covers has expired (epoch s).

    user is the sub of the tokens it covers (a user revocation's is its subject): on a
    Redis Cluster it picks the keys' group. None where unknown: the entry then goes to
    every group.
    """

    kind: Kind
    subject: str
    expires_at: int
    cutoff_ms: int | None = None
    user: str | None = None

    @property
    def owner(self) -> str | None:
        """The user whose tokens this entry covers, if known."""
        return self.subject if self.kind is Kind.USER else self.user


class TokenRef(NamedTuple):
    """The claims a revocation check needs (a tuple: built, hashed and compared per request)."""

    jti: str
    exp: int
    sid: str
    sxp: int
    sub: str

    @classmethod
    def from_claims(cls, claims: dict[str, object]) -> TokenRef:
        """Build from decoded JWT claims; a token without sid is its own session."""
        jti = str(claims["jti"])
        exp = int(str(claims["exp"]))
        sid = str(claims.get("sid") or jti)
        sxp = int(str(claims.get("sxp") or exp))
        return cls(jti=jti, exp=exp, sid=sid, sxp=sxp, sub=str(claims["sub"]))


class State(NamedTuple):
    """What a blocklist says of itself: loaded into the process that answers, and its seq."""

    loaded: bool
    seq: int


# What recall gives: the value kept under a subject (None: none usable now), and how to
# keep one read now, which a message naming the subject since the recall cancels.
Recalled = tuple[Any, Callable[[Any], None]]


def keep_nothing(_value: Any) -> None:
    """The keeper of a blocklist that keeps nothing."""


class Blocklist(Protocol):
    """What the service needs from a blocklist, whatever stores it."""

    async def check(self, ref: TokenRef) -> Verdict:
        """Answer for one token; raises BlocklistUnavailable when it cannot."""
        ...

    def known(self, ref: TokenRef) -> Verdict | None:
        """An answer that needs no I/O (kept from an earlier check), if there is one."""
        ...

    async def add(self, entries: Iterable[Entry], *, seq: int | None = None) -> None:
        """Store revocations numbered up to seq; returns only once they are in force."""
        ...

    async def rebuild(self, entries: AsyncIterable[Entry], *, seq: int = 0) -> bool:
        """Load durable revocations up to seq and mark the blocklist ready; False if busy."""
        ...

    def recall(self, subject: Subject) -> Recalled:
        """What this worker keeps under subject while no change to it can have been missed."""
        ...

    async def announce(self, subjects: Iterable[Subject]) -> None:
        """Tell every worker these subjects changed; returns once none keeps what it had."""
        ...

    async def state(self) -> State:
        """Whether the blocklist is loaded into the Redis process that answers, and its seq."""
        ...

    async def invalidate(self) -> None:
        """Mark the blocklist not loaded: every check fails closed until the next rebuild."""
        ...

    async def probe(self, ref: TokenRef) -> Verdict:
        """Run one real check, as a request would, for ref (a token nobody holds)."""
        ...

    @property
    def floor(self) -> int:
        """The highest seq this process knows the blocklist held."""
        ...

    def raise_floor(self, seq: int | None) -> None:
        """Note that the blocklist held seq."""
        ...

    async def close(self) -> None:
        """Release connections of this process."""
        ...


async def release_locks(client: Any, keys: list[str], token: str) -> None:
    """Give back the rebuild locks token holds, in one round trip (per node), if Redis answers.

    Best effort: a lock Redis does not answer for expires after REBUILD_LOCK_SECONDS.
    """
    with contextlib.suppress(Exception):
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.eval(RELEASE_LOCK_SCRIPT, 1, key, token)
            await pipe.execute()


def nobody() -> TokenRef:
    """A token nobody holds, of a user nobody is, for probes."""
    now = int(time.time())
    name = os.urandom(8).hex()
    return TokenRef(jti=name, exp=now + 60, sid=name, sxp=now + 60, sub=name)


SUBJECT_KINDS = {Kind.TOKEN: feed.TOKEN, Kind.SESSION: feed.SESSION, Kind.USER: feed.USER}


def _subject(entry: Entry) -> Subject:
    """What an entry names, as the kept verdicts are indexed (by jti, sid or sub)."""
    return (SUBJECT_KINDS[entry.kind], entry.subject)


def session_started_ms(ref: TokenRef) -> int:
    """Milliseconds when the token's session began, read from its UUIDv7 sid."""
    try:
        return issued_millis(ref.sid)
    except ValueError:
        return ref.exp * 1000


class RedisBlocklist:
    """Blocklist in Redis, through one redis.asyncio pool on the worker's event loop."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        shards: int,
        bucket_seconds: int,
        session_bucket_seconds: int = 3600,
        timeout: float,
        max_connections: int,
        propagation: float = 0.0,
        kept_verdicts: int = 8192,
    ) -> None:
        self._target = parse_target(url)
        self._prefix = prefix
        self._shards = shards
        self._widths = {
            Kind.TOKEN: ("r", bucket_seconds),
            Kind.SESSION: ("s", session_bucket_seconds),
        }
        self._timeout = timeout
        self._max_connections = max_connections
        self._ready_key = f"{prefix}ready"
        self._lock_key = f"{prefix}rebuild-lock"
        self._seq_key = f"{prefix}seq"
        self._channel = f"{prefix}revoked"
        self._redis: aredis.Redis | None = None
        self._check_script: AsyncScript | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._down_until = 0.0
        self._run_id = ""
        self._propagation = propagation
        self._kept_verdicts = kept_verdicts
        self._feed: RevocationFeed | None = None
        self._floor = 0

    def bucket_key(self, kind: Kind, subject: str, expires_at: int) -> str:
        """The hash that holds subject, chosen by its expiry bucket and a hash of the id."""
        letter, width = self._widths[kind]
        shard = zlib.crc32(subject.encode()) % self._shards
        return f"{self._prefix}{letter}:{expires_at // width}:{shard}"

    def bucket_end(self, kind: Kind, expires_at: int) -> int:
        """When the bucket holding an entry with this expiry may go (epoch s)."""
        width = self._widths[kind][1]
        return (expires_at // width + 1) * width + 1

    def user_key(self, user_id: str) -> str:
        """The key that holds a user's revocation cutoff."""
        return f"{self._prefix}u:{user_id}"

    def _clients(self) -> aredis.Redis:
        """The pooled client, made on first use in the process that uses it."""
        if self._redis is None:
            # Past max_connections a call waits for a free connection (up to the timeout)
            # instead of failing at once. A pooled connection found closed (Redis restarted
            # meanwhile) is replaced and the call tried once more; a timeout is not retried.
            self._redis = connect(
                self._target,
                timeout=self._timeout,
                max_connections=self._max_connections,
                blocking=True,
                health_check_interval=30,
                redis_connect_func=self._on_connect,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
            self._check_script = self._redis.register_script(CHECK_SCRIPT)
        return self._redis

    async def _on_connect(self, connection: aredis.connection.AbstractConnection) -> None:
        """Learn the server's run_id on every new connection: a restart shows up here."""
        await connection.on_connect()
        await connection.send_command("INFO", "server")
        self._run_id = parse_run_id(await connection.read_response())

    def _check_call(self, ref: TokenRef) -> tuple[list[str], list[str | int]]:
        """Keys and arguments of the check script for one token, but run_id and floor."""
        keys = [
            self._ready_key,
            self.bucket_key(Kind.TOKEN, ref.jti, ref.exp),
            self.bucket_key(Kind.SESSION, ref.sid, ref.sxp),
            self.user_key(ref.sub),
            self._seq_key,
        ]
        return keys, [ref.jti, ref.sid, session_started_ms(ref)]

    def _refuse_if_down(self) -> None:
        if self._down_until and time.monotonic() < self._down_until:
            # Recently unreachable: answer 503 at once instead of waiting out a timeout.
            raise BlocklistUnavailable("blocklist unreachable moments ago")

    def _unreachable(self, exc: Exception) -> BlocklistUnavailable:
        metrics.redis_error("check")
        if not self._down_until and self._redis is not None:
            # Every pooled connection may be stale now (a restarted server): start afresh
            # rather than let each fail once more and hold the breaker open again.
            pool = self._redis.connection_pool
            self._closing.add(asyncio.get_running_loop().create_task(pool.disconnect()))
        self._down_until = time.monotonic() + BREAKER_SECONDS
        return BlocklistUnavailable.because(exc)

    @property
    def floor(self) -> int:
        """The highest seq this process knows the blocklist held: checks demand at least it."""
        return self._floor

    def raise_floor(self, seq: int | None) -> None:
        """Note that the blocklist held seq (a write answered, a message, a read)."""
        if seq is not None and seq > self._floor:
            self._floor = seq

    def known(self, ref: TokenRef) -> Verdict | None:
        """The verdict kept since the last revocation that could change it, if any; no I/O."""
        feed = self._current_feed()
        if feed is None:
            return None
        kept = feed.lookup(ref)
        if kept is None:
            return None  # counted as a miss by the check that follows
        metrics.kept_verdict(True)
        return Verdict(kept)

    def recall(self, subject: Subject) -> Recalled:
        """A value kept under subject on the feed, and its keeper (see Blocklist.recall)."""
        feed = self._current_feed()
        if feed is None:
            return None, keep_nothing
        kept = feed.lookup(subject)
        cache, generation = feed.cache, feed.cache.generation
        return kept, lambda value: cache.keep_under(subject, value, generation, (subject,))

    async def check(self, ref: TokenRef) -> Verdict:
        """A kept verdict, else one EVALSHA: is the token, its session or its user revoked?"""
        feed = self._current_feed()
        generation = 0
        if feed is not None:
            kept = feed.lookup(ref)
            metrics.kept_verdict(kept is not None)
            if kept is not None:
                return Verdict(kept)
            generation = feed.cache.generation
        verdict = await self._ask(ref)
        if feed is not None and verdict is not Verdict.NOT_LOADED:
            feed.cache.keep(ref, verdict, generation, revocable=verdict is Verdict.VALID)
        return verdict

    @metrics.timed_check
    async def _ask(self, ref: TokenRef) -> Verdict:
        """Run the check script for ref on the pool, with the run_id the pool last learned."""
        self._refuse_if_down()
        client = self._clients()
        assert self._check_script is not None
        keys, args = self._check_call(ref)
        try:
            run_id = self._run_id
            result = await self._check_script(keys, [*args, run_id, self._floor], client)
            if self._run_id != run_id:
                # The call (re)connected, perhaps to a restarted server: ask again with the
                # run_id learned on that connection, or a stale snapshot would pass.
                result = await self._check_script(keys, [*args, self._run_id, self._floor], client)
        except RedisError as exc:
            raise self._unreachable(exc) from exc
        self._down_until = 0.0
        return Verdict(int(result))

    async def probe(self, ref: TokenRef) -> Verdict:
        """The check script, run as a request's check runs it, never answered from memory."""
        return await self._ask(ref)

    @property
    def prefix(self) -> str:
        """The prefix of every key and channel this blocklist uses."""
        return self._prefix

    @property
    def feed(self) -> RevocationFeed | None:
        """The feed this blocklist's checks made; None before the first or if none keep."""
        return self._feed

    def _current_feed(self) -> RevocationFeed | None:
        """The feed of revocations, unless verdicts are never kept."""
        if not self._propagation:
            return None
        if self._feed is None:
            # A connection of its own, never retried behind the feed's back: a lost
            # subscription must be seen at once, as every message may have been missed.
            subscriber = connect(self._target, timeout=self._timeout, retry=Retry(NoBackoff(), 0))
            self._feed = RevocationFeed(
                subscriber,
                channel=self._channel,
                window=self._propagation,
                timeout=self._timeout,
                size=self._kept_verdicts,
                on_seq=self.raise_floor,
            )
        return self._feed

    async def add(self, entries: Iterable[Entry], *, seq: int | None = None) -> None:
        """Write revocations, and return once no worker may still use a verdict they change.

        That is once every worker subscribed when Redis took the write has acknowledged
        reading it, or at the latest the propagation window later, past which no worker
        trusts a verdict it kept (see revocation_feed.py).
        """
        entries = list(entries)
        if entries:
            await self._announced(entries, seq, [_subject(entry) for entry in entries])

    async def announce(self, subjects: Iterable[Subject]) -> None:
        """Announce a change no revocation records (an OAuth client's), as add would."""
        await self._announced([], None, list(subjects))

    async def _announced(
        self, entries: list[Entry], seq: int | None, subjects: list[Subject]
    ) -> None:
        """Write entries announcing subjects; return once acknowledged, or the window after."""
        feed = self._current_feed()
        if feed is None:
            await self._write(entries, seq, None, subjects)
            return
        if feed.started:
            # Subscribed, the writer hears the acknowledgements: a worker whose feed went
            # idle subscribes again first (a round trip or two) rather than wait the whole
            # window. A process that never checks (a command) just waits the window.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(feed.subscribe(), self._propagation / 2)
        with feed.receipt() as receipt:
            readers = await self._write(entries, seq, receipt, subjects)
            if receipt is None:
                await asyncio.sleep(self._propagation)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receipt.all_of(readers), self._propagation)

    async def _write(
        self,
        entries: list[Entry],
        seq: int | None,
        receipt: Receipt | None,
        subjects: list[Subject],
    ) -> int:
        """Write revocations and their seq in one transaction, announcing subjects to every worker.

        Returns how many subscribers the announcement reached.
        """
        client = self._clients()
        announcement = message(subjects, seq or 0, receipt)
        try:
            async with client.pipeline(transaction=True) as pipe:
                self._queue(pipe, entries)
                if seq is not None:
                    pipe.eval(RAISE_SEQ_SCRIPT, 1, self._seq_key, seq)
                pipe.publish(self._channel, announcement)
                replies = await pipe.execute()
        except RedisError as exc:
            metrics.redis_error("write")
            raise BlocklistUnavailable.because(exc) from exc
        self.raise_floor(seq)
        return int(replies[-1])

    def _queue(self, pipe: aredis.client.Pipeline, entries: list[Entry]) -> None:
        """Queue entries: one HSET and one EXPIREAT per bucket, one script per user cutoff."""
        buckets: dict[str, tuple[dict[str, int], int]] = {}
        for entry in entries:
            if entry.kind is Kind.USER:
                assert entry.cutoff_ms is not None
                pipe.eval(
                    RAISE_CUTOFF_SCRIPT,
                    1,
                    self.user_key(entry.subject),
                    entry.cutoff_ms,
                    entry.expires_at,
                )
                continue
            key = self.bucket_key(entry.kind, entry.subject, entry.expires_at)
            fields, _ = buckets.setdefault(key, ({}, self.bucket_end(entry.kind, entry.expires_at)))
            fields[entry.subject] = 1
        for key, (fields, end) in buckets.items():
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.expireat(key, end)

    @metrics.counted_rebuild
    async def rebuild(self, entries: AsyncIterable[Entry], *, seq: int = 0) -> bool:
        """Copy durable revocations in, then mark the blocklist loaded; one process at a time.

        False when another process holds the lock, or when Redis lost it meanwhile (a
        restart during the load): what was loaded may be gone, and the caller tries again.
        """
        client = self._clients()
        token = os.urandom(8).hex()
        try:
            if not await client.set(self._lock_key, token, nx=True, ex=REBUILD_LOCK_SECONDS):
                return False
            try:
                run_id = parse_run_id(await client.info("server"))
                if not await self._load_all(client, entries, token):
                    return False
                keys = (self._lock_key, self._ready_key, self._seq_key)
                finish = (token, run_id, seq, self._channel, message(None, seq))
                if not await client.eval(FINISH_LOAD_SCRIPT, 3, *keys, *finish):
                    return False
            except BaseException:
                await release_locks(client, [self._lock_key], token)
                raise
        except RedisError as exc:
            raise BlocklistUnavailable.because(exc) from exc
        self.raise_floor(seq)
        return True

    async def _load_all(
        self, client: aredis.Redis, entries: AsyncIterable[Entry], token: str
    ) -> bool:
        """Write entries in batches, each while the next is read; False once the lock is lost."""
        writing: asyncio.Task[bool] | None = None
        batch: list[Entry] = []
        try:
            async for entry in entries:
                batch.append(entry)
                if len(batch) >= LOAD_BATCH:
                    if writing is not None and not await writing:
                        return False
                    writing = asyncio.ensure_future(self._load(client, batch, token))
                    batch = []
            if writing is not None and not await writing:
                return False
            writing = None
            return await self._load(client, batch, token)
        finally:
            if writing is not None and not writing.done():
                writing.cancel()

    async def _load(self, client: aredis.Redis, entries: list[Entry], token: str) -> bool:
        """Write one batch of a rebuild, unannounced; False once the lock is no longer ours."""
        async with client.pipeline(transaction=False) as pipe:
            self._queue(pipe, entries)
            pipe.eval(EXTEND_LOCK_SCRIPT, 1, self._lock_key, token, REBUILD_LOCK_SECONDS)
            replies = await pipe.execute()
        return bool(replies[-1])

    async def state(self) -> State:
        """Whether Redis holds the blocklist loaded into the process that answers, and its seq."""
        client = self._clients()
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.get(self._ready_key)
                pipe.get(self._seq_key)
                pipe.info("server")
                ready, seq, info = await pipe.execute()
        except RedisError as exc:
            raise BlocklistUnavailable.because(exc) from exc
        loaded = isinstance(ready, bytes) and ready.decode() == parse_run_id(info)
        return State(loaded=loaded, seq=int(seq or 0))

    async def invalidate(self) -> None:
        """Drop the loaded mark: every check of every worker answers NOT_LOADED until rebuilt."""
        try:
            await self._clients().delete(self._ready_key)
        except RedisError as exc:
            raise BlocklistUnavailable.because(exc) from exc

    async def eviction_policy(self) -> str | None:
        """Redis's maxmemory-policy, or None where CONFIG is not allowed."""
        client = self._clients()
        try:
            policy = await client.config_get("maxmemory-policy")
        except RedisError:
            return None
        for key, value in policy.items():
            if key in ("maxmemory-policy", b"maxmemory-policy"):
                return value.decode() if isinstance(value, bytes) else str(value)
        return None

    async def close(self) -> None:
        """Stop the feed and close the pool."""
        if self._feed is not None:
            await self._feed.close()
            self._feed = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


def parse_run_id(info: object) -> str:
    """The run_id field of an INFO server reply, raw or parsed."""
    if isinstance(info, dict):
        return str(info.get("run_id", ""))
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.removeprefix("run_id:").strip()
    return ""

"""The revocation blocklist: at most one Redis round trip per check, memory bounded by expiry.

Layout under the configured prefix:
  ready                   the run_id of the Redis process the blocklist was loaded into: a
                          restart (even from a snapshot) or a failover changes the run_id,
                          so a blocklist that may have lost entries is reloaded first
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
import hashlib
import os
import threading
import time
import zlib
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, NamedTuple, Protocol, cast

import redis
import redis.asyncio as aredis
from redis.exceptions import NoScriptError, RedisError

from service.ids import issued_millis
from service.store import revocation_feed as feed
from service.store.check_pipeline import CheckPipeline, command, encode, parse_run_id
from service.store.revocation_feed import RevocationFeed, Subject, message

CHECK_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[4] then return 2 end
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

CHECK_SHA = hashlib.sha1(CHECK_SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis's script id

WRITE_BATCH = 1000
ENCODED_CHECKS = 8192
REBUILD_LOCK_SECONDS = 30
BREAKER_SECONDS = 0.5


class BlocklistUnavailable(RuntimeError):
    """The blocklist cannot answer (Redis unreachable or not yet rebuilt): fail closed."""


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
    """One revocation; expires_at is when every token it covers has expired (epoch s)."""

    kind: Kind
    subject: str
    expires_at: int
    cutoff_ms: int | None = None


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


class Blocklist(Protocol):
    """What the service needs from a blocklist, whatever stores it."""

    def check(self, ref: TokenRef) -> Verdict:
        """Answer for one token; raises BlocklistUnavailable when it cannot."""
        ...

    async def check_async(self, ref: TokenRef) -> Verdict:
        """The same answer, awaited on the server's event loop."""
        ...

    async def add(self, entries: Iterable[Entry]) -> None:
        """Store revocations; returns only once they are in force."""
        ...

    async def rebuild(self, entries: AsyncIterable[Entry]) -> bool:
        """Load every durable revocation and mark the blocklist ready; False if busy elsewhere."""
        ...

    async def ping(self) -> bool:
        """Whether the blocklist is reachable and loaded."""
        ...

    async def close(self) -> None:
        """Release connections of this process."""
        ...


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
    """Blocklist in Redis: sync client for the per-request check, asyncio client for writes."""

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
        self._url = url
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
        self._connections: list[redis.connection.AbstractConnection] = []
        self._async: aredis.Redis | None = None
        self._factory: redis.ConnectionPool | None = None
        self._local = threading.local()
        self._down_until = 0.0
        self._run_id = ""
        self._pid: int | None = None
        self._init_lock = threading.Lock()
        self._pipeline: CheckPipeline | None = None
        self._encoded: dict[TokenRef, tuple[int, bytes]] = {}
        self._channel = f"{prefix}revoked"
        self._propagation = propagation
        self._kept_verdicts = kept_verdicts
        self._feed: RevocationFeed | None = None

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
        """This process's asyncio client (writes, rebuilds) and check-connection factory."""
        if self._async is None or self._pid != os.getpid():
            with self._init_lock:
                if self._async is None or self._pid != os.getpid():
                    options: dict[str, Any] = {
                        "socket_timeout": self._timeout,
                        "socket_connect_timeout": self._timeout,
                        "health_check_interval": 30,
                    }
                    self._async = aredis.Redis.from_url(
                        self._url, max_connections=self._max_connections, **options
                    )
                    self._factory = redis.ConnectionPool.from_url(
                        self._url, redis_connect_func=self._on_connect, **options
                    )
                    self._connections = []
                    self._pid = os.getpid()
        return self._async

    def _connection(self) -> redis.connection.AbstractConnection:
        """This thread's own connection for checks: no pool queue on the hot path."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            self._clients()
            assert self._factory is not None
            local.connection = self._factory.make_connection()
            local.pid = os.getpid()
            self._connections.append(local.connection)
        connection: redis.connection.AbstractConnection = local.connection
        return connection

    def _evalsha(self, keys: list[str], args: list[str | int]) -> Any:
        """EVALSHA of the check script on this thread's connection, loading it if needed."""
        connection = self._connection()
        command = ("EVALSHA", CHECK_SHA, len(keys), *keys, *args)
        try:
            try:
                connection.send_command(*command)  # type: ignore[no-untyped-call]
                return connection.read_response()
            except NoScriptError:
                connection.send_command("SCRIPT", "LOAD", CHECK_SCRIPT)  # type: ignore[no-untyped-call]
                connection.read_response()
                connection.send_command(*command)  # type: ignore[no-untyped-call]
                return connection.read_response()
        except RedisError:
            connection.disconnect()  # type: ignore[no-untyped-call]
            raise

    def _on_connect(self, connection: redis.connection.AbstractConnection) -> None:
        """Learn the server's run_id on every new connection: a restart shows up here."""
        connection.on_connect()  # type: ignore[no-untyped-call]
        connection.send_command("INFO", "server")  # type: ignore[no-untyped-call]
        self._run_id = parse_run_id(connection.read_response())

    def _check_call(self, ref: TokenRef) -> tuple[list[str], list[str | int]]:
        """Keys and arguments of the check script for one token, but the run_id."""
        keys = [
            self._ready_key,
            self.bucket_key(Kind.TOKEN, ref.jti, ref.exp),
            self.bucket_key(Kind.SESSION, ref.sid, ref.sxp),
            self.user_key(ref.sub),
        ]
        return keys, [ref.jti, ref.sid, session_started_ms(ref)]

    def _encoded_check(self, ref: TokenRef) -> tuple[int, bytes]:
        """One token's check command, RESP-encoded but the run_id, with its argument count."""
        encoded = self._encoded.get(ref)
        if encoded is None:
            keys, args = self._check_call(ref)
            parts = ["EVALSHA", CHECK_SHA, len(keys), *keys, *args]
            encoded = (len(parts), encode(*parts))
            if len(self._encoded) >= ENCODED_CHECKS:
                self._encoded.clear()
            self._encoded[ref] = encoded
        return encoded

    def _refuse_if_down(self) -> None:
        if self._down_until and time.monotonic() < self._down_until:
            # Recently unreachable: answer 503 at once instead of waiting out a timeout.
            raise BlocklistUnavailable("blocklist unreachable moments ago")

    def _verdict(self, result: Any) -> Verdict:
        self._down_until = 0.0
        return Verdict(int(result))

    def _unreachable(self, exc: Exception) -> BlocklistUnavailable:
        self._down_until = time.monotonic() + BREAKER_SECONDS
        return BlocklistUnavailable(f"blocklist unreachable: {type(exc).__name__}")

    def check(self, ref: TokenRef) -> Verdict:
        """One EVALSHA: is the token, its session or its user's older sessions revoked?"""
        self._refuse_if_down()
        keys, args = self._check_call(ref)
        try:
            run_id = self._run_id
            result = self._evalsha(keys, [*args, run_id])
            if self._run_id != run_id:
                # The call (re)connected, perhaps to a restarted server: ask again with the
                # run_id learned on that connection, or a stale snapshot would pass.
                result = self._evalsha(keys, [*args, self._run_id])
        except RedisError as exc:
            raise self._unreachable(exc) from exc
        return self._verdict(result)

    async def check_async(self, ref: TokenRef) -> Verdict:
        """The same check, from a verdict kept since the last revocation or else pipelined.

        Concurrent checks that do reach Redis share one write.
        """
        feed = self._current_feed()
        if feed is not None:
            kept = feed.lookup(ref)
            if kept is not None:
                return cast(Verdict, kept)
            generation = feed.cache.generation
        self._refuse_if_down()
        count, encoded = self._encoded_check(ref)
        pipeline = self._pipeline
        if pipeline is None or not pipeline.usable:
            pipeline = self._pipeline = CheckPipeline(
                self._url, timeout=self._timeout, script=CHECK_SCRIPT
            )
        try:
            # The run_id is the one learned on the pipeline's own connection.
            result = await pipeline.call(
                lambda run_id: command(count + 1, encoded + encode(run_id))
            )
        except RedisError as exc:
            raise self._unreachable(exc) from exc
        verdict = self._verdict(result)
        if feed is not None and verdict is not Verdict.NOT_LOADED:
            feed.cache.keep(ref, verdict, generation, revocable=verdict is Verdict.VALID)
        return verdict

    def _current_feed(self) -> RevocationFeed | None:
        """This loop's feed of revocations, unless verdicts are never kept."""
        if not self._propagation:
            return None
        feed = self._feed
        if feed is None or not feed.usable:
            feed = self._feed = RevocationFeed(
                self._url,
                channel=self._channel,
                window=self._propagation,
                timeout=self._timeout,
                size=self._kept_verdicts,
            )
        return feed

    async def add(self, entries: Iterable[Entry]) -> None:
        """Write revocations, and return once no worker may still use a verdict they change."""
        entries = list(entries)
        await self._write(entries)
        if entries and self._propagation:
            await asyncio.sleep(self._propagation)

    async def _write(self, entries: list[Entry]) -> None:
        """Write revocations in one pipeline, announcing them to every worker last."""
        client = self._clients()
        try:
            async with client.pipeline(transaction=False) as pipe:
                for entry in entries:
                    self._queue(pipe, entry)
                if entries:
                    pipe.publish(self._channel, message(map(_subject, entries)))
                await pipe.execute()
        except RedisError as exc:
            raise BlocklistUnavailable(f"blocklist unreachable: {type(exc).__name__}") from exc

    def _queue(self, pipe: aredis.client.Pipeline, entry: Entry) -> None:
        if entry.kind is Kind.USER:
            assert entry.cutoff_ms is not None
            pipe.eval(
                RAISE_CUTOFF_SCRIPT,
                1,
                self.user_key(entry.subject),
                entry.cutoff_ms,
                entry.expires_at,
            )
            return
        key = self.bucket_key(entry.kind, entry.subject, entry.expires_at)
        pipe.hset(key, entry.subject, 1)
        pipe.expireat(key, self.bucket_end(entry.kind, entry.expires_at))

    async def rebuild(self, entries: AsyncIterable[Entry]) -> bool:
        """Copy durable revocations in, then set the ready key; one process at a time."""
        client = self._clients()
        token = os.urandom(8).hex()
        try:
            if not await client.set(self._lock_key, token, nx=True, ex=REBUILD_LOCK_SECONDS):
                return False
            batch: list[Entry] = []
            async for entry in entries:
                batch.append(entry)
                if len(batch) >= WRITE_BATCH:
                    await self._write(batch)
                    batch = []
            await self._write(batch)
            await client.set(self._ready_key, parse_run_id(await client.info("server")))
            if await client.get(self._lock_key) == token.encode():
                await client.delete(self._lock_key)
            return True
        except RedisError as exc:
            raise BlocklistUnavailable(f"blocklist unreachable: {type(exc).__name__}") from exc

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

    async def ping(self) -> bool:
        """Whether Redis answers and holds a loaded blocklist."""
        client = self._clients()
        try:
            ready = await client.get(self._ready_key)
            run_id = parse_run_id(await client.info("server"))
        except RedisError:
            return False
        return isinstance(ready, bytes) and ready.decode() == run_id

    async def close(self) -> None:
        """Close both connection pools of this process, the check pipeline and the feed."""
        if self._feed is not None:
            await self._feed.close()
            self._feed = None
        if self._pipeline is not None:
            await self._pipeline.close()
            self._pipeline = None
        if self._pid == os.getpid():
            if self._async is not None:
                await self._async.aclose()
            for connection in self._connections:
                connection.disconnect()  # type: ignore[no-untyped-call]
        self._connections = []
        self._async = None

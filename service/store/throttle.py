"""Counters of failed attempts, shared by every worker and host through Redis.

A counter lives for a window from its first failure; past its limit, attempts wait for
the window to end. One Lua script reads, counts and clears the counters of an attempt
atomically, so a success racing a failure never sees half of the other's writes.
Subjects (usernames, client ids, addresses) are kept only as keyed digests: keys have a
fixed length, and Redis never holds a username in clear.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Protocol

import redis.asyncio as aredis
from flask import current_app
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from service import metrics
from service.config import Settings
from service.store.redis_target import Topology, connect, parse_target

Op = Literal["check", "fail", "pass"]

BREAKER_SECONDS = 1.0
MEMORY_ENTRIES = 10_000  # development: ~100 bytes each, oldest dropped first

log = logging.getLogger(__name__)

# KEYS: the counters, then the known-pair marker when ARGV[3] (its lifetime, ms) is not 0.
# ARGV: op, window (ms), marker lifetime (ms), then per counter: its limit and a flag
# ("c" cleared by a success, "x" not enforced for a known pair, "-" neither).
# Returns the milliseconds until every counter that refuses has expired (0: none refuses).
# check: refuses at limit failures; fail: counts, and says whether this one was past it;
# pass: a success, refused like a check, else clears "c" counters and sets the marker.
SCRIPT = """
local op, window, remember = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n, known = #KEYS, false
if remember > 0 then
  n = n - 1
  known = redis.call('GET', KEYS[n + 1]) ~= false
end
local past = 0
if op == 'fail' then past = 1 end
local wait = 0
for i = 1, n do
  local key, limit, flag = KEYS[i], tonumber(ARGV[2 + 2 * i]), ARGV[3 + 2 * i]
  local count
  if op == 'fail' then
    count = redis.call('INCR', key)
    if count == 1 then redis.call('PEXPIRE', key, window) end
  else
    count = tonumber(redis.call('GET', key) or '0')
  end
  if count >= limit + past and not (known and flag == 'x') then
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then ttl = window end
    if ttl > wait then wait = ttl end
  end
end
if op == 'pass' and wait == 0 then
  for i = 1, n do
    if ARGV[3 + 2 * i] == 'c' then redis.call('DEL', KEYS[i]) end
  end
  if remember > 0 then redis.call('SET', KEYS[n + 1], '1', 'PX', remember) end
end
return wait
"""


class ThrottleUnavailable(Exception):
    """The counters cannot be read or written right now."""


@dataclass(frozen=True, slots=True)
class Counter:
    """Failures counted against one subject, and how many a window allows."""

    name: str
    subject: tuple[str, ...]
    limit: int
    cleared_by_success: bool = False
    exempt_if_known: bool = False

    @property
    def flag(self) -> str:
        """The script's flag for this counter."""
        return "c" if self.cleared_by_success else "x" if self.exempt_if_known else "-"


@dataclass(frozen=True, slots=True)
class Attempt:
    """The counters one attempt meets; a success may mark its pair as known."""

    kind: str
    counters: tuple[Counter, ...]
    window: int
    known: tuple[str, ...] = ()
    known_ttl: int = 0


class Throttle(Protocol):
    """Failure counters: each call answers seconds to wait (0: go ahead)."""

    async def check(self, attempt: Attempt) -> float:
        """How long this attempt must wait before it is made."""

    async def fail(self, attempt: Attempt) -> float:
        """Count a failure; non-zero when it was already past a limit."""

    async def succeed(self, attempt: Attempt) -> float:
        """Accept a success unless a limit was reached meanwhile (then: the wait)."""

    async def close(self) -> None:
        """Release connections."""


class KeyNames:
    """Redis key names of counters: prefix, kind, counter, then a keyed digest of the subject.

    On a Redis Cluster the kind is the keys' hash tag: one script reads every counter of
    an attempt, and counters are shared between attempts of one kind (an address's
    counter meets every username tried from it), so a kind's counters share one slot.
    """

    def __init__(self, prefix: str, secret: str | None, *, cluster: bool = False) -> None:
        self._prefix = f"{prefix}throttle:"
        self._cluster = cluster
        self._key = hashlib.sha256(b"authsvc throttle keys\0" + (secret or "").encode()).digest()

    def _digest(self, subject: tuple[str, ...]) -> str:
        data = "\0".join(subject).encode("utf-8", "surrogateescape")
        return hashlib.blake2b(data, key=self._key, digest_size=16).hexdigest()

    def counter(self, attempt: Attempt, counter: Counter) -> str:
        """The key of one counter."""
        return f"{self._prefix}{self._kind(attempt)}:{counter.name}:{self._digest(counter.subject)}"

    def _kind(self, attempt: Attempt) -> str:
        return f"{{{attempt.kind}}}" if self._cluster else attempt.kind

    def known(self, attempt: Attempt) -> str:
        """The key marking the attempt's pair as one that succeeded before."""
        return f"{self._prefix}{self._kind(attempt)}:known:{self._digest(attempt.known)}"


class RedisThrottle:
    """Counters in Redis, through this process's own asyncio client (created on first use)."""

    def __init__(
        self, url: str, *, prefix: str, secret: str | None, timeout: float, max_connections: int
    ) -> None:
        self._target = parse_target(url)
        self._names = KeyNames(prefix, secret, cluster=self._target.topology is Topology.CLUSTER)
        self._timeout = timeout
        self._max_connections = max_connections
        self._client: aredis.Redis | None = None
        self._script: AsyncScript | None = None
        self._pid: int | None = None
        self._down_until = 0.0

    def _connect(self) -> tuple[aredis.Redis, AsyncScript]:
        if self._client is None or self._script is None or self._pid != os.getpid():
            self._client = connect(
                self._target,
                timeout=self._timeout,
                max_connections=self._max_connections,
                health_check_interval=30,
            )
            self._script = self._client.register_script(SCRIPT)
            self._pid = os.getpid()
        return self._client, self._script

    async def _run(self, op: Op, attempt: Attempt) -> float:
        if time.monotonic() < self._down_until:
            # Failed moments ago: answer at once instead of waiting out another timeout.
            raise ThrottleUnavailable("throttle counters unreachable moments ago")
        client, script = self._connect()
        keys = [self._names.counter(attempt, counter) for counter in attempt.counters]
        remember = attempt.known_ttl * 1000 if attempt.known else 0
        if remember:
            keys.append(self._names.known(attempt))
        args: list[str | int] = [op, attempt.window * 1000, remember]
        for counter in attempt.counters:
            args += [counter.limit, counter.flag]
        try:
            wait_ms = await script(keys=keys, args=args, client=client)
        except (RedisError, OSError) as exc:
            metrics.redis_error("throttle")
            if not self._down_until:
                log.warning("throttle counters unreachable: %s", type(exc).__name__)
            self._down_until = time.monotonic() + BREAKER_SECONDS
            raise ThrottleUnavailable(type(exc).__name__) from exc
        self._down_until = 0.0
        return int(wait_ms) / 1000

    async def check(self, attempt: Attempt) -> float:
        """How long this attempt must wait before it is made."""
        return await self._run("check", attempt)

    async def fail(self, attempt: Attempt) -> float:
        """Count a failure; non-zero when it was already past a limit."""
        return await self._run("fail", attempt)

    async def succeed(self, attempt: Attempt) -> float:
        """Accept a success unless a limit was reached meanwhile (then: the wait)."""
        return await self._run("pass", attempt)

    async def close(self) -> None:
        """Close this process's connections."""
        if self._client is not None and self._pid == os.getpid():
            await self._client.aclose()
        self._client = self._script = None


def now() -> float:
    """The in-memory counters' clock (seconds; tests travel in time by replacing it)."""
    return time.monotonic()


class MemoryThrottle:
    """Development counters in this process: the script's rules over a bounded dict."""

    def __init__(self, secret: str | None, max_entries: int = MEMORY_ENTRIES) -> None:
        self._names = KeyNames("", secret)
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()

    @property
    def kept(self) -> int:
        """How many counters are kept now (at most max_entries)."""
        return len(self._entries)

    def _get(self, key: str) -> tuple[int, float] | None:
        entry = self._entries.get(key)
        if entry is not None and entry[1] <= now():
            del self._entries[key]
            return None
        return entry

    def _put(self, key: str, count: int, expires: float) -> None:
        self._entries[key] = (count, expires)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def _run(self, op: Op, attempt: Attempt) -> float:
        known = bool(attempt.known) and self._get(self._names.known(attempt)) is not None
        past = 1 if op == "fail" else 0
        wait = 0.0
        for counter in attempt.counters:
            key = self._names.counter(attempt, counter)
            entry = self._get(key)
            count, expires = entry if entry else (0, now() + attempt.window)
            if op == "fail":
                count += 1
                self._put(key, count, expires)
            if count >= counter.limit + past and not (known and counter.exempt_if_known):
                wait = max(wait, expires - now())
        if op == "pass" and not wait:
            for counter in attempt.counters:
                if counter.cleared_by_success:
                    self._entries.pop(self._names.counter(attempt, counter), None)
            if attempt.known:
                self._put(self._names.known(attempt), 1, now() + attempt.known_ttl)
        return math.ceil(wait * 1000) / 1000

    async def check(self, attempt: Attempt) -> float:
        """How long this attempt must wait before it is made."""
        return self._run("check", attempt)

    async def fail(self, attempt: Attempt) -> float:
        """Count a failure; non-zero when it was already past a limit."""
        return self._run("fail", attempt)

    async def succeed(self, attempt: Attempt) -> float:
        """Accept a success unless a limit was reached meanwhile (then: the wait)."""
        return self._run("pass", attempt)

    async def close(self) -> None:
        """Nothing to release."""


def get_throttle() -> Throttle:
    """The failure counters of the current app."""
    throttle: Throttle = current_app.extensions["throttle"]
    return throttle


def make_throttle(settings: Settings) -> Throttle:
    """Redis counters when REDIS_URL is set, else bounded in-process ones (development)."""
    if settings.redis_url is None:
        return MemoryThrottle(settings.secret_key)
    return RedisThrottle(
        settings.redis_url,
        prefix=settings.redis_prefix,
        secret=settings.secret_key,
        timeout=settings.redis_timeout,
        max_connections=settings.redis_pool_size + settings.password_hash_threads,
    )

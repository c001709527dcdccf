"""Verdicts a worker may reuse while Redis says nothing about them changed.

Every write to the blocklist publishes what it covers (and its number) on one channel.
Each worker keeps the verdicts its checks received and drops those a message names. A
kept verdict is used only while the worker can show it has read every message published
more than `window` seconds ago: a PING sent on its subscription less than `window` ago
has been answered, and Redis delivers messages and replies on one connection in order. A
write returns only `window` after Redis took it (see RedisBlocklist.add), so once a logout
answers, every worker of every host has either dropped the token's verdict or asks Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ResponseError

from service.store.check_pipeline import (
    call_on_owner,
    command,
    encode,
    open_connection,
    preamble,
)

# What a message names, by the TokenRef field it matches: jti, sid or sub.
Subject = tuple[str, str]


class Revocable(Protocol):
    """What a token is revoked by (a TokenRef): its id, its session and its user."""

    @property
    def jti(self) -> str: ...

    @property
    def sid(self) -> str: ...

    @property
    def sub(self) -> str: ...


# The kinds of subject, one per TokenRef field a revocation can name.
TOKEN, SESSION, USER = "t", "s", "u"


def subjects_of(ref: Revocable) -> tuple[Subject, Subject, Subject]:
    """The subjects whose revocation would change ref's verdict."""
    return ((TOKEN, ref.jti), (SESSION, ref.sid), (USER, ref.sub))


PROBES_PER_WINDOW = 4
IDLE_AFTER = 1.0  # seconds without a lookup before the subscription ends
RECONNECT_DELAY = 0.1
PING = command(1, encode("PING"))

log = logging.getLogger(__name__)


BOOTTIME = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def clock() -> float:
    """Seconds on a clock that keeps counting while the machine is suspended.

    A verdict's freshness is an age: on the monotonic clock, which stops during a suspend
    (a laptop's sleep, some VM pauses), a worker waking up would still count as fresh.
    """
    return time.clock_gettime(BOOTTIME)


def message(subjects: Iterable[Subject] | None, seq: int) -> bytes:
    """The payload announcing a write numbered seq that covers these subjects (None: any)."""
    named = None if subjects is None else [list(subject) for subject in subjects]
    return json.dumps({"seq": seq, "subjects": named}).encode()


def parse_message(data: bytes) -> tuple[list[Subject] | None, int] | None:
    """The subjects (None: any) and number a payload names, or None when it is unreadable."""
    try:
        body = json.loads(data)
    except ValueError:
        return None
    if not isinstance(body, dict) or type(body.get("seq")) is not int:
        return None
    items = body.get("subjects", ())
    if items is None:
        return None, body["seq"]
    if not isinstance(items, list):
        return None
    subjects = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and all(type(x) is str for x in item)):
            return None
        subjects.append((item[0], item[1]))
    return subjects, body["seq"]


class VerdictCache:
    """Verdicts by token, with the subjects that would change them; used on one loop only."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._verdicts: dict[Revocable, int] = {}
        self._holders: dict[Subject, list[Revocable]] = {}
        self._indexed = 0
        self.generation = 0
        self.fresh_since = -math.inf
        self.last_lookup = -math.inf

    def __len__(self) -> int:
        return len(self._verdicts)

    def get(self, ref: Revocable, now: float, window: float) -> int | None:
        """The kept verdict of ref, if the subscription proved fresh within window of now."""
        self.last_lookup = now
        if now - self.fresh_since >= window:
            return None
        return self._verdicts.get(ref)

    def keep(self, ref: Revocable, verdict: int, generation: int, *, revocable: bool) -> None:
        """Keep a verdict read at generation, unless a message or a reset came since."""
        if generation != self.generation or self._size == 0:
            return
        if len(self._verdicts) >= self._size or self._indexed >= 4 * self._size:
            self._clear()
        self._verdicts[ref] = verdict
        if revocable:
            for subject in subjects_of(ref):
                self._holders.setdefault(subject, []).append(ref)
            self._indexed += 3

    def drop(self, subjects: Iterable[Subject]) -> None:
        """Forget every verdict a revocation of these subjects may change."""
        self.generation += 1
        for subject in subjects:
            for ref in self._holders.pop(subject, ()):
                self._verdicts.pop(ref, None)

    def reset(self) -> None:
        """Forget everything and trust nothing until the next answered probe."""
        self.generation += 1
        self.fresh_since = -math.inf
        self._clear()

    def _clear(self) -> None:
        self._verdicts.clear()
        self._holders.clear()
        self._indexed = 0


class _Subscription(asyncio.Protocol):
    """One subscribed connection: messages drop verdicts, answered probes prove freshness."""

    def __init__(
        self,
        cache: VerdictCache,
        subscribed: asyncio.Future[None],
        on_seq: Callable[[int], object],
    ) -> None:
        self.cache = cache
        self.on_seq = on_seq
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.subscribed = subscribed
        self.probes: deque[float] = deque()
        self.last_probe = -math.inf
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.ended = subscribed.get_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            self._handle(reply)

    def _handle(self, reply: Any) -> None:
        if isinstance(reply, ResponseError):
            if not self.subscribed.done():
                self.subscribed.set_exception(reply)
            self.close()
            return
        kind = reply[0] if isinstance(reply, list) and reply else None
        if kind == b"message":
            parsed = parse_message(reply[2])
            if parsed is None or parsed[0] is None:
                # Unreadable, or a load that may change anything: no kept verdict holds.
                self.cache.reset()
            else:
                self.cache.drop(parsed[0])
            if parsed is not None:
                self.on_seq(parsed[1])
        elif kind == b"pong" and self.probes:
            self.cache.fresh_since = self.probes.popleft()
        elif kind == b"subscribe" and not self.subscribed.done():
            # Messages missed before this point may have named anything kept.
            self.cache.reset()
            self.subscribed.set_result(None)

    def probe(self, now: float) -> None:
        """Send a PING; its answer proves every earlier message has been read."""
        if self.transport is not None and not self.closed:
            self.probes.append(now)
            self.last_probe = now
            self.transport.write(PING)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:  # close() got here first; a newer subscription may own the cache
            return
        self.closed = True
        self.cache.reset()
        self.ended.set_result(None)
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def close(self) -> None:
        """Hang up; kept verdicts go with the connection."""
        if self.transport is not None:
            self.transport.close()
        self.connection_lost(None)


class RevocationFeed:
    """The subscription of one process and loop, kept while lookups keep coming.

    Lookups send the probes (at most PROBES_PER_WINDOW per window): a busy worker stays
    fresh, an idle one costs nothing and unsubscribes after IDLE_AFTER.
    """

    def __init__(
        self,
        url: str,
        *,
        channel: str,
        window: float,
        timeout: float,
        size: int,
        on_seq: Callable[[int], object],
    ) -> None:
        self.cache = VerdictCache(size)
        self._on_seq = on_seq
        self.window = window
        self._interval = window / PROBES_PER_WINDOW
        self._options: dict[str, Any] = dict(parse_url(url))
        self._channel = channel
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._pid = os.getpid()
        self._task: asyncio.Task[None] | None = None
        self._subscription: _Subscription | None = None

    @property
    def usable(self) -> bool:
        """Whether this feed belongs to the running loop of this process."""
        return self._loop is asyncio.get_running_loop() and self._pid == os.getpid()

    def lookup(self, ref: Revocable) -> int | None:
        """A verdict that is safe to reuse now, if one is kept; probes and subscribes."""
        now = clock()
        subscription = self._subscription
        if subscription is not None and not subscription.closed:
            if now - subscription.last_probe >= self._interval:
                self._probe(subscription, now)
        elif self._task is None or self._task.done():
            self._task = self._loop.create_task(self._run())
        return self.cache.get(ref, now, self.window)

    def _probe(self, subscription: _Subscription, now: float) -> None:
        if subscription.probes and now - subscription.probes[0] > self._timeout:
            log.warning("revocation feed stalled: reconnecting")
            subscription.close()
        else:
            subscription.probe(now)

    async def _run(self) -> None:
        """Subscribe, and again whenever the connection ends, until lookups stop."""
        while clock() - self.cache.last_lookup < IDLE_AFTER:
            try:
                subscription = await asyncio.wait_for(self._subscribe(), self._timeout)
            except (OSError, TimeoutError, ResponseError) as exc:
                log.warning("revocation feed unavailable: %s", type(exc).__name__)
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            try:
                while (idle := clock() - self.cache.last_lookup) < IDLE_AFTER:
                    ended, _ = await asyncio.wait([subscription.ended], timeout=IDLE_AFTER - idle)
                    if ended:
                        break
            finally:
                subscription.close()

    async def _subscribe(self) -> _Subscription:
        subscribed: asyncio.Future[None] = self._loop.create_future()
        subscription = await open_connection(
            self._loop, self._options, lambda: _Subscription(self.cache, subscribed, self._on_seq)
        )
        assert subscription.transport is not None
        requests = preamble(self._options, select=False)  # channels span every database
        requests.append(command(2, encode("SUBSCRIBE", self._channel)))
        subscription.transport.write(b"".join(requests))
        try:
            await subscribed
        except BaseException:
            subscription.close()
            raise
        self._subscription = subscription
        return subscription

    async def close(self) -> None:
        """Stop the subscription, from whichever loop calls (it is owned by its own)."""
        call_on_owner(self._loop, self._pid, self._stop)

    def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._subscription is not None:
            self._subscription.close()

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
import contextlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import redis.asyncio as aredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

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


# The kinds of subject, one per TokenRef field a revocation can name, and OAuth clients.
TOKEN, SESSION, USER, CLIENT = "t", "s", "u", "c"


def subjects_of(ref: Revocable) -> tuple[Subject, Subject, Subject]:
    """The subjects whose revocation would change ref's verdict."""
    return ((TOKEN, ref.jti), (SESSION, ref.sid), (USER, ref.sub))


PROBES_PER_WINDOW = 4
IDLE_AFTER = 1.0  # seconds without a lookup before the subscription ends
RECONNECT_DELAY = 0.1

log = logging.getLogger(__name__)


BOOTTIME = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def clock() -> float:
    """Seconds on a clock that keeps counting while the machine is suspended.

    A verdict's freshness is an age: on the monotonic clock, which stops during a suspend
    (a laptop's sleep, some VM pauses), a worker waking up would still count as fresh.
    """
    return time.clock_gettime(BOOTTIME)


def message(subjects: Iterable[Subject] | None, seq: int, receipt: Receipt | None = None) -> bytes:
    """The payload announcing a write numbered seq that covers these subjects (None: any).

    With a receipt, every worker that reads it says so on the receipt's channel.
    """
    named = None if subjects is None else [list(subject) for subject in subjects]
    body: dict[str, object] = {"seq": seq, "subjects": named}
    if receipt is not None:
        body["ack"] = [receipt.channel, receipt.id]
    return json.dumps(body).encode()


def acknowledgement(data: bytes) -> tuple[str, str] | None:
    """The channel and id a payload asks its readers to acknowledge on, if any."""
    try:
        ack = json.loads(data).get("ack")
    except (ValueError, AttributeError):
        return None
    if isinstance(ack, list) and len(ack) == 2 and all(type(x) is str for x in ack):
        return ack[0], ack[1]
    return None


class Receipt:
    """Acknowledgements of one announced write, counted as the workers that read it send them."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.id = os.urandom(8).hex()
        self.count = 0
        self._changed = asyncio.Event()

    def acknowledged(self) -> None:
        """One more worker read the write."""
        self.count += 1
        self._changed.set()

    async def all_of(self, readers: int) -> None:
        """Return once readers workers have acknowledged."""
        while self.count < readers:
            self._changed.clear()
            await self._changed.wait()


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
    """Verdicts by token, with the subjects that would change them; used on one loop only.

    It also keeps other facts a message can change (an OAuth client, under its subject).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._verdicts: dict[object, Any] = {}
        self._holders: dict[Subject, list[object]] = {}
        self._indexed = 0
        self.generation = 0
        self.fresh_since = -math.inf
        self.last_lookup = -math.inf

    def __len__(self) -> int:
        return len(self._verdicts)

    def get(self, ref: object, now: float, window: float) -> Any:
        """The kept verdict of ref, if the subscription proved fresh within window of now."""
        self.last_lookup = now
        if now - self.fresh_since >= window:
            return None
        return self._verdicts.get(ref)

    def keep(self, ref: Revocable, verdict: int, generation: int, *, revocable: bool) -> None:
        """Keep a verdict read at generation, unless a message or a reset came since."""
        self.keep_under(ref, verdict, generation, subjects_of(ref) if revocable else ())

    def keep_under(
        self, key: object, value: Any, generation: int, subjects: Sequence[Subject]
    ) -> None:
        """Keep value under key until a message names one of subjects (or a reset)."""
        if generation != self.generation or self._size == 0:
            return
        if len(self._verdicts) >= self._size or self._indexed >= 4 * self._size:
            self._clear()
        self._verdicts[key] = value
        for subject in subjects:
            self._holders.setdefault(subject, []).append(key)
        self._indexed += len(subjects)

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


class RevocationFeed:
    """The worker's subscription to the revocation channel, kept while lookups keep coming.

    One task reads the subscription (redis-py's PubSub) and sends a PING on it every
    window / PROBES_PER_WINDOW: a busy worker stays fresh, an idle one costs nothing and
    unsubscribes after IDLE_AFTER. The same subscription carries the acknowledgements of
    this worker's own writes (see Receipt), on a channel of its own.
    """

    def __init__(
        self,
        client: aredis.Redis,
        *,
        channel: str,
        window: float,
        timeout: float,
        size: int,
        on_seq: Callable[[int], object],
    ) -> None:
        self.cache = VerdictCache(size)
        self.window = window
        self._client = client
        self._channel = channel
        self._acks = f"{channel}:acks:{os.urandom(8).hex()}"
        self._timeout = timeout
        self._on_seq = on_seq
        self._interval = window / PROBES_PER_WINDOW
        self._probes: deque[float] = deque()
        self._receipts: dict[str, Receipt] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self.subscription: PubSub | None = None
        self.subscribed = False
        self._ready = asyncio.Event()

    def lookup(self, ref: object) -> Any:
        """A verdict that is safe to reuse now, if one is kept; subscribes when idle."""
        self._start()
        return self.cache.get(ref, clock(), self.window)

    @property
    def started(self) -> bool:
        """Whether this process ever looked a verdict up (it serves checks)."""
        return self._task is not None

    async def subscribe(self) -> bool:
        """Make sure the subscription runs and wait for it (callers bound the wait)."""
        self.cache.last_lookup = clock()  # a write counts as use: it keeps the feed alive
        self._start()
        await self._ready.wait()
        return self.subscribed

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self.cache.last_lookup = clock()
            self._task = asyncio.get_running_loop().create_task(self._run())

    @contextlib.contextmanager
    def receipt(self) -> Iterator[Receipt | None]:
        """A receipt for a write about to be announced, while subscribed (else None)."""
        if not self.subscribed:
            yield None
            return
        receipt = Receipt(self._acks)
        self._receipts[receipt.id] = receipt
        try:
            yield receipt
        finally:
            del self._receipts[receipt.id]

    async def _run(self) -> None:
        """Subscribe, and again whenever the subscription fails, until lookups stop."""
        while clock() - self.cache.last_lookup < IDLE_AFTER:
            pubsub = self.subscription = self._client.pubsub()
            try:
                await asyncio.wait_for(self._subscribe(pubsub), self._timeout)
                self.subscribed = True
                self._ready.set()
                await self._read(pubsub)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("revocation feed unavailable: %s", type(exc).__name__)
            finally:
                self.subscribed = False
                self._ready.clear()
                self._forget()
                self.subscription = None
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(RECONNECT_DELAY)

    async def _subscribe(self, pubsub: PubSub) -> None:
        """Subscribe and wait for Redis to confirm both channels: messages count from there."""
        await pubsub.subscribe(self._channel, self._acks)
        while True:
            reply = await pubsub.get_message(timeout=self._timeout)
            if reply is not None:
                self._handle(reply)
                if reply["type"] == "subscribe" and reply["data"] == 2:
                    return

    async def _read(self, pubsub: PubSub) -> None:
        """Apply messages and probe answers until lookups stop or the subscription stalls."""
        last_probe = -math.inf
        while (now := clock()) - self.cache.last_lookup < IDLE_AFTER:
            if self._probes and now - self._probes[0] > self._timeout:
                raise TimeoutError("revocation feed stalled")
            if now - last_probe >= self._interval:
                self._probes.append(now)
                last_probe = now
                await pubsub.ping()
            reply = await pubsub.get_message(timeout=self._interval)
            if reply is not None:
                self._handle(reply)

    def _handle(self, reply: dict[str, Any]) -> None:
        kind = reply["type"]
        if kind == "message" and reply["channel"] == self._acks.encode():
            receipt = self._receipts.get(reply["data"].decode(errors="replace"))
            if receipt is not None:
                receipt.acknowledged()
        elif kind == "message":
            self._apply(reply["data"])
        elif kind == "pong" and reply["data"] == b"" and self._probes:
            # Redis answers on one connection in order: every earlier message was read.
            self.cache.fresh_since = self._probes.popleft()
        elif kind == "subscribe":
            # Messages missed before this point (a first subscription, or one redis-py
            # renewed after a reconnect) may have named anything kept.
            self._forget()

    def _apply(self, data: bytes) -> tuple[list[Subject] | None, int] | None:
        """Drop what a revocation may change, then tell its writer, if it asks, that we did.

        Returns the message as parse_message reads it.
        """
        parsed = parse_message(data)
        if parsed is None or parsed[0] is None:
            # Unreadable, or a load that may change anything: no kept verdict holds.
            self.cache.reset()
        else:
            self.cache.drop(parsed[0])
        if parsed is not None:
            self._on_seq(parsed[1])
        ack = acknowledgement(data)
        if ack is not None:
            sending = asyncio.get_running_loop().create_task(self._acknowledge(*ack))
            self._sending.add(sending)
            sending.add_done_callback(self._sent)
        return parsed

    async def _acknowledge(self, channel: str, receipt_id: str) -> None:
        await self._client.publish(channel, receipt_id)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The writer waits out the window instead: nothing is lost but time.
            log.debug("acknowledgement not sent: %s", type(task.exception()).__name__)

    def _forget(self) -> None:
        """Drop every kept verdict and every probe in flight: trust nothing until answered."""
        self.cache.reset()
        self._probes.clear()

    async def close(self) -> None:
        """Stop the subscription and close its connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for sending in list(self._sending):
            sending.cancel()
        await self._client.aclose()

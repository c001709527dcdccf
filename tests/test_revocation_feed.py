"""Verdicts a worker keeps between revocations: dropped in time, never trusted when stale."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from urllib.parse import urlsplit

import pytest
import redis

from service.config import Settings
from service.store import revocation_feed
from service.store.blocklist import Entry, Kind, RedisBlocklist, TokenRef, Verdict
from service.store.revocation_feed import (
    IDLE_AFTER,
    RevocationFeed,
    VerdictCache,
    message,
    parse_message,
)
from tests.blocklist_helpers import durable, make_blocklist, new_ref
from tests.proxy import TcpProxy

WINDOW = 0.025


def keeping(url: str, prefix: str, window: float = WINDOW) -> RedisBlocklist:
    """A blocklist whose checks keep verdicts, as a worker's do."""
    return make_blocklist(url, prefix, propagation=window)


def feed_of(blocklist: RedisBlocklist) -> RevocationFeed:
    """The feed the blocklist's checks made on this loop."""
    feed = blocklist.feed
    assert feed is not None
    return feed


async def kept(blocklist: RedisBlocklist, ref: TokenRef) -> Verdict:
    """Check ref until the worker keeps its verdict (its feed has subscribed); return it."""
    deadline = time.monotonic() + 5
    verdict = await blocklist.check(ref)
    while feed_of(blocklist).lookup(ref) is None:
        assert time.monotonic() < deadline, "the verdict was never kept"
        await asyncio.sleep(WINDOW / 4)
        verdict = await blocklist.check(ref)
    return verdict


def revocations_of(ref: TokenRef) -> list[Entry]:
    """Each kind of revocation that covers ref."""
    return [
        Entry(Kind.TOKEN, ref.jti, ref.exp),
        Entry(Kind.SESSION, ref.sid, ref.sxp),
        Entry(Kind.USER, ref.sub, ref.sxp, cutoff_ms=int(time.time() * 1000)),
    ]


# The cache alone.


def test_a_verdict_is_used_only_while_fresh() -> None:
    cache, ref = VerdictCache(8), new_ref()
    cache.keep(ref, Verdict.VALID, cache.generation, revocable=True)
    assert cache.get(ref, now=100.0, window=WINDOW) is None  # no probe answered yet
    cache.fresh_since = 100.0
    assert cache.get(ref, now=100.0 + WINDOW / 2, window=WINDOW) is Verdict.VALID
    assert cache.get(ref, now=100.0 + WINDOW, window=WINDOW) is None


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_message_drops_the_verdicts_it_may_change(index: int) -> None:
    cache, ref, other = VerdictCache(8), new_ref(), new_ref()
    cache.fresh_since = 100.0
    for each in (ref, other):
        cache.keep(each, Verdict.VALID, cache.generation, revocable=True)
    letter = "tsu"[index]
    cache.drop([(letter, ref[(0, 2, 4)[index]])])
    assert cache.get(ref, now=100.0, window=WINDOW) is None
    assert cache.get(other, now=100.0, window=WINDOW) is Verdict.VALID


def test_a_verdict_read_before_a_message_is_not_kept() -> None:
    cache, ref = VerdictCache(8), new_ref()
    cache.fresh_since = 100.0
    generation = cache.generation
    cache.drop([("t", "some other token")])  # arrived while ref's check was on its way
    cache.keep(ref, Verdict.VALID, generation, revocable=True)
    assert cache.get(ref, now=100.0, window=WINDOW) is None
    cache.keep(ref, Verdict.VALID, cache.generation, revocable=True)
    assert cache.get(ref, now=100.0, window=WINDOW) is Verdict.VALID


def test_a_value_kept_under_a_subject_goes_with_a_message_naming_it() -> None:
    cache, ref = VerdictCache(8), new_ref()
    cache.fresh_since = 100.0
    client, other = ("c", "client-a"), ("c", "client-b")
    cache.keep_under(client, "record a", cache.generation, (client,))
    cache.keep_under(other, "record b", cache.generation, (other,))
    cache.keep(ref, Verdict.VALID, cache.generation, revocable=True)
    cache.drop([client])
    assert cache.get(client, now=100.0, window=WINDOW) is None
    assert cache.get(other, now=100.0, window=WINDOW) == "record b"
    assert cache.get(ref, now=100.0, window=WINDOW) is Verdict.VALID
    generation = cache.generation
    cache.drop([other])  # a change announced while the record was being read again
    cache.keep_under(client, "stale record", generation, (client,))
    assert cache.get(client, now=100.0, window=WINDOW) is None


def test_a_reset_forgets_and_distrusts_everything() -> None:
    cache, ref = VerdictCache(8), new_ref()
    cache.fresh_since = 100.0
    cache.keep(ref, Verdict.REVOKED, cache.generation, revocable=False)
    cache.reset()
    cache.fresh_since = 100.0
    assert cache.get(ref, now=100.0, window=WINDOW) is None
    assert len(cache) == 0


def test_the_cache_stays_bounded() -> None:
    cache = VerdictCache(4)
    for _ in range(50):
        cache.keep(new_ref(), Verdict.VALID, cache.generation, revocable=True)
        assert len(cache) <= 4
    off = VerdictCache(0)
    off.keep(new_ref(), Verdict.VALID, off.generation, revocable=True)
    assert len(off) == 0


def test_messages_round_trip_and_garbage_is_refused() -> None:
    subjects = [("t", "a"), ("s", "line\nbreak"), ("u", '"quoted"')]
    assert parse_message(message(subjects, 42)) == (subjects, 42)
    assert parse_message(message(None, 7)) == (None, 7)
    garbage_bodies = [
        b"",
        b"not json",
        b"[1, 2]",
        b'[["t"]]',
        b"{}",
        b'{"seq": "1", "subjects": []}',
    ]
    for garbage in [*garbage_bodies, b'{"seq": 1, "subjects": [["t"]]}']:
        assert parse_message(garbage) is None, garbage


# Against Redis.


@pytest.fixture
async def worker(settings: Settings, prefix: str) -> AsyncIterator[RedisBlocklist]:
    """One worker's loaded blocklist, keeping verdicts."""
    blocklist = keeping(str(settings.redis_url), prefix)
    assert await blocklist.rebuild(durable())
    yield blocklist
    await blocklist.close()


class OtherWorker:
    """A blocklist on a thread and loop of its own: another worker, as far as timing goes."""

    def __init__(self, url: str, prefix: str, window: float = WINDOW) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.blocklist = keeping(url, prefix, window)

    def keeps(self, ref: TokenRef) -> Verdict:
        """Check ref on the other worker until it keeps the verdict (it is subscribed then)."""
        return asyncio.run_coroutine_threadsafe(kept(self.blocklist, ref), self._loop).result(5)

    def check(self, ref: TokenRef) -> Verdict:
        """Check ref on the other worker."""
        return asyncio.run_coroutine_threadsafe(self.blocklist.check(ref), self._loop).result(5)

    def add(self, entries: list[Entry]) -> Future[None]:
        """Revoke on the other worker's loop; the future ends when add() returned there."""
        return asyncio.run_coroutine_threadsafe(self.blocklist.add(entries), self._loop)

    def close(self) -> None:
        """Close its connections and stop its thread."""
        asyncio.run_coroutine_threadsafe(self.blocklist.close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def other_worker(settings: Settings, prefix: str) -> Iterator[OtherWorker]:
    """A second worker on the same blocklist."""
    other = OtherWorker(str(settings.redis_url), prefix)
    yield other
    other.close()


async def test_a_kept_verdict_is_asked_again_only_after_a_revocation(
    worker: RedisBlocklist, other_worker: OtherWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Counted at this worker's own calls: the shared Redis serves other clients too.
    asked: list[TokenRef] = []
    ask = RedisBlocklist._ask

    async def counted(self: RedisBlocklist, ref: TokenRef) -> Verdict:
        asked.append(ref)
        return await ask(self, ref)

    monkeypatch.setattr(RedisBlocklist, "_ask", counted)
    ref, bystander = new_ref(), new_ref()
    assert await kept(worker, ref) is Verdict.VALID
    assert await kept(worker, bystander) is Verdict.VALID
    calls = len(asked)
    for _ in range(100):
        assert await worker.check(ref) is Verdict.VALID
    assert len(asked) == calls
    await asyncio.wrap_future(other_worker.add([Entry(Kind.TOKEN, ref.jti, ref.exp)]))
    assert await worker.check(ref) is Verdict.REVOKED
    assert await worker.check(bystander) is Verdict.VALID
    assert len(asked) == calls + 1


@pytest.mark.parametrize("kind", list(Kind))
async def test_no_worker_accepts_a_token_once_its_revocation_returned(
    worker: RedisBlocklist, other_worker: OtherWorker, kind: Kind
) -> None:
    """The guarantee, raced: one worker checks without pause while another revokes."""
    index = list(Kind).index(kind)
    for _ in range(20):
        ref = new_ref()
        assert await kept(worker, ref) is Verdict.VALID
        returned = other_worker.add([revocations_of(ref)[index]])
        while True:
            # A busy worker: its loop reads nothing, messages and answers pile up unread.
            time.sleep(random.uniform(0, WINDOW))
            done = returned.done()  # from here on, only REVOKED may come back
            verdict = await worker.check(ref)
            if done:
                assert verdict is Verdict.REVOKED
                break
            await asyncio.sleep(0)
        returned.result()


async def test_an_idle_writer_subscribes_and_hears_its_own_acknowledgement(
    settings: Settings, prefix: str
) -> None:
    window = 2.0
    writer = keeping(str(settings.redis_url), prefix, window)
    try:
        assert await writer.rebuild(durable())
        await kept(writer, new_ref())
        await asyncio.sleep(IDLE_AFTER + window / 4 + 0.3)  # no lookup for a while: it unsubscribed
        assert not feed_of(writer).subscribed
        started = time.monotonic()
        await writer.add(revocations_of(new_ref())[:1])
        assert time.monotonic() - started < window / 4
        started = time.monotonic()
        await writer.add([])
        assert time.monotonic() - started < window / 4
    finally:
        await writer.close()


async def test_a_revocation_returns_once_every_subscribed_worker_read_it(
    settings: Settings, prefix: str
) -> None:
    window = 2.0  # far longer than the acknowledgements take
    writer = keeping(str(settings.redis_url), prefix, window)
    reader = OtherWorker(str(settings.redis_url), prefix, window)
    try:
        assert await writer.rebuild(durable())
        ref = new_ref()
        assert await kept(writer, ref) is Verdict.VALID
        assert await asyncio.to_thread(reader.keeps, ref) is Verdict.VALID
        started = time.monotonic()
        await writer.add(revocations_of(ref)[:1])
        assert time.monotonic() - started < window / 4
        # Acknowledged: the reader has dropped what it kept, on its own loop.
        assert await asyncio.to_thread(reader.check, ref) is Verdict.REVOKED
        assert await writer.check(ref) is Verdict.REVOKED
    finally:
        await writer.close()
        reader.close()


async def test_a_reader_that_never_acknowledges_holds_the_writer_for_the_window(
    settings: Settings, prefix: str
) -> None:
    window = 0.3
    writer = keeping(str(settings.redis_url), prefix, window)
    silent = redis.Redis.from_url(str(settings.redis_url)).pubsub()
    try:
        assert await writer.rebuild(durable())
        silent.subscribe(f"{prefix}revoked")  # counts as a reader, and never answers
        assert await kept(writer, new_ref()) is Verdict.VALID
        started = time.monotonic()
        await writer.add(revocations_of(new_ref())[:1])
        assert time.monotonic() - started >= window
    finally:
        silent.close()
        await writer.close()


async def test_a_process_that_never_checks_waits_out_the_window(
    settings: Settings, prefix: str
) -> None:
    command = keeping(str(settings.redis_url), prefix)  # a command, not a worker
    try:
        assert await command.rebuild(durable())
        started = time.monotonic()
        await command.add(revocations_of(new_ref())[:1])
        assert time.monotonic() - started >= WINDOW
    finally:
        await command.close()


async def test_a_silent_subscription_makes_every_check_ask_redis(worker: RedisBlocklist) -> None:
    ref = new_ref()
    assert await kept(worker, ref) is Verdict.VALID
    subscription = feed_of(worker).subscription
    assert subscription is not None and subscription.connection is not None
    # No message and no answered probe gets through on it any more.
    subscription.connection._writer.transport.pause_reading()  # type: ignore[union-attr]
    await asyncio.sleep(WINDOW * 1.5)
    assert feed_of(worker).lookup(ref) is None
    await worker.add(revocations_of(ref)[:1])
    assert await worker.check(ref) is Verdict.REVOKED
    # Unanswered probes past the timeout: the feed starts over on a new connection.
    deadline = time.monotonic() + 5
    while feed_of(worker).subscription is subscription:
        assert time.monotonic() < deadline, "the stalled subscription was kept"
        await worker.check(ref)
        await asyncio.sleep(WINDOW)
    assert subscription.connection is None
    assert await kept(worker, ref) is Verdict.REVOKED


async def test_a_lost_subscription_forgets_what_it_kept(settings: Settings, prefix: str) -> None:
    upstream = urlsplit(str(settings.redis_url))
    proxy = TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 6379)
    proxy.start()
    proxied = keeping(f"redis://127.0.0.1:{proxy.port}{upstream.path or '/0'}", prefix)
    try:
        assert await proxied.rebuild(durable())
        ref = new_ref()
        assert await kept(proxied, ref) is Verdict.VALID
        proxy.stop()
        await asyncio.sleep(WINDOW)
        assert len(feed_of(proxied).cache) == 0
        assert feed_of(proxied).lookup(ref) is None
        proxy.start()
        assert await kept(proxied, ref) is Verdict.VALID
    finally:
        await proxied.close()
        proxy.close()


async def test_an_unreadable_message_forgets_everything(
    worker: RedisBlocklist, settings: Settings, prefix: str
) -> None:
    ref = new_ref()
    assert await kept(worker, ref) is Verdict.VALID
    direct = redis.Redis.from_url(str(settings.redis_url))
    try:
        direct.publish(f"{prefix}revoked", b"garbage")
    finally:
        direct.close()
    await asyncio.sleep(WINDOW)
    assert feed_of(worker).lookup(ref) is None
    assert len(feed_of(worker).cache) == 0


async def test_an_idle_worker_unsubscribes_and_comes_back(
    worker: RedisBlocklist, settings: Settings, prefix: str
) -> None:
    channel = f"{prefix}revoked"
    direct = redis.Redis.from_url(str(settings.redis_url))
    try:
        ref = new_ref()
        assert await kept(worker, ref) is Verdict.VALID
        assert direct.pubsub_numsub(channel) == [(channel.encode(), 1)]
        await asyncio.sleep(IDLE_AFTER + 0.2)
        assert direct.pubsub_numsub(channel) == [(channel.encode(), 0)]
        assert feed_of(worker).lookup(ref) is None
        assert await kept(worker, ref) is Verdict.VALID
        assert direct.pubsub_numsub(channel) == [(channel.encode(), 1)]
    finally:
        direct.close()


async def test_a_worker_woken_from_a_suspend_trusts_nothing_it_kept(
    worker: RedisBlocklist, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = new_ref()
    assert await kept(worker, ref) is Verdict.VALID
    assert revocation_feed.BOOTTIME == time.CLOCK_BOOTTIME
    slept = revocation_feed.clock() + 10  # what the suspend-aware clock reads on waking
    monkeypatch.setattr(revocation_feed, "clock", lambda: slept)
    assert feed_of(worker).lookup(ref) is None

"""Redis Cluster: a check stays one script in one slot, and a failover lets no revoked token in."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Container, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import pytest
import redis
from flask import Flask
from redis.crc import key_slot

from service.config import Settings
from service.store import Store
from service.store.blocklist import BlocklistUnavailable, Entry, Kind, State, TokenRef, Verdict
from service.store.cluster_blocklist import ClusterBlocklist
from service.store.groups import GROUPS, group_of, group_tags
from service.store.revocation_feed import CLIENT, Subject
from tests.blocklist_helpers import RecordUnreadable, durable, failing_midway, new_ref
from tests.conftest import (
    README,
    Session,
    documented_acl,
    for_user,
    login,
    register,
    serve_in_process,
    settings_beside,
)
from tests.servers import RedisClusterGroup

PASSWORD = "correct horse battery"
T = TypeVar("T")
PREFIX = "cluster:"
WINDOW = 0.025
ACK_WINDOW = 1.0  # long enough to tell a write that was acknowledged from one that waited


def test_groups_spread_evenly_over_the_slots() -> None:
    tags = group_tags()
    assert [key_slot(tag.encode()) for tag in tags] == [g * 16384 // GROUPS for g in range(GROUPS)]


def test_the_keys_of_one_check_share_one_slot_and_users_spread() -> None:
    blocklist = ClusterBlocklist(
        "redis+cluster://127.0.0.1:7000/",
        prefix=PREFIX,
        shards=16,
        bucket_seconds=60,
        timeout=0.5,
        max_connections=4,
    )
    now = int(time.time())
    slots = set()
    for n in range(200):
        user = f"user-{n}"
        ref = TokenRef(jti=f"j{n}", exp=now + 60, sid=f"s{n}", sxp=now + 3600, sub=user)
        group = group_of(user)
        keys = blocklist.check_keys(group, ref)
        assert len({key_slot(key.encode()) for key in keys}) == 1, keys
        written = blocklist.group_bucket_key(group, Kind.TOKEN, ref.jti, ref.exp)
        assert written == keys[1]
        slots.add(key_slot(keys[0].encode()))
    assert len(slots) > 100  # 200 users over 256 groups


# A real cluster


def sub_of(session: Session) -> str:
    """The user id an access token carries."""
    payload = session.access.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["sub"])


def _started_cluster(directory: Path) -> Iterator[RedisClusterGroup]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: apt-get install redis-server")
        pytest.skip("redis-server is not installed")
    group = RedisClusterGroup(directory)
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterGroup]:
    """Three primaries with a replica each, of this test's own."""
    yield from _started_cluster(tmp_path)


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterGroup]:
    """Three primaries with a replica each, for the tests that kill nothing."""
    yield from _started_cluster(tmp_path_factory.mktemp("cluster"))


def keeping(url: str, prefix: str, window: float = WINDOW) -> ClusterBlocklist:
    """A cluster blocklist whose checks keep verdicts, as a worker's do."""
    return ClusterBlocklist(
        url,
        prefix=prefix,
        shards=4,
        bucket_seconds=60,
        timeout=0.3,
        max_connections=4,
        propagation=window,
    )


async def kept(blocklist: ClusterBlocklist, ref: TokenRef) -> Verdict:
    """Check ref until the worker keeps its verdict (its node's feed has subscribed)."""
    deadline = time.monotonic() + 5
    verdict = await blocklist.check(ref)
    while blocklist.known(ref) is None:
        assert time.monotonic() < deadline, "the verdict was never kept"
        await asyncio.sleep(WINDOW / 4)
        verdict = await blocklist.check(ref)
    return verdict


def revocations_of(ref: TokenRef) -> list[Entry]:
    """Each kind of revocation that covers ref, with its user."""
    return [
        Entry(Kind.TOKEN, ref.jti, ref.exp, user=ref.sub),
        Entry(Kind.SESSION, ref.sid, ref.sxp, user=ref.sub),
        Entry(Kind.USER, ref.sub, ref.sxp, cutoff_ms=int(time.time() * 1000)),
    ]


class OtherWorker:
    """A cluster blocklist on a thread and loop of its own: another worker."""

    def __init__(self, url: str, prefix: str, window: float = WINDOW) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.blocklist = keeping(url, prefix, window)

    def add(self, entries: list[Entry]) -> Future[None]:
        """Revoke on the other worker's loop; the future ends when add() returned there."""
        return asyncio.run_coroutine_threadsafe(self.blocklist.add(entries), self._loop)

    def announce(self, subjects: list[Subject]) -> Future[None]:
        """Announce a change on the other worker's loop; the future ends once it returned."""
        return asyncio.run_coroutine_threadsafe(self.blocklist.announce(subjects), self._loop)

    def kept(self, ref: TokenRef) -> Future[Verdict]:
        """Check ref on the other worker until it keeps the verdict (its feed subscribed)."""
        return asyncio.run_coroutine_threadsafe(kept(self.blocklist, ref), self._loop)

    def close(self) -> None:
        """Close its connections and stop its thread."""
        asyncio.run_coroutine_threadsafe(self.blocklist.close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


Workers = tuple[ClusterBlocklist, OtherWorker]


async def two_workers(url: str, window: float) -> AsyncIterator[Workers]:
    """Two workers on one loaded cluster blocklist of a prefix of their own."""
    prefix = f"feed{random.randrange(1 << 30)}:"
    worker = keeping(url, prefix, window)
    assert await worker.rebuild(durable())
    other = OtherWorker(url, prefix, window)
    yield worker, other
    other.close()
    await worker.close()


@pytest.fixture
async def workers(shared_cluster: RedisClusterGroup) -> AsyncIterator[Workers]:
    """Two workers, keeping verdicts for a short window."""
    async for pair in two_workers(shared_cluster.url, WINDOW):
        yield pair


@pytest.fixture
async def acking_workers(shared_cluster: RedisClusterGroup) -> AsyncIterator[Workers]:
    """Two workers with a long window: only acknowledgements let a write return early."""
    async for pair in two_workers(shared_cluster.url, ACK_WINDOW):
        yield pair


@pytest.mark.fault
async def test_a_kept_verdict_is_reused_until_a_revocation_on_a_cluster(
    workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, other = workers
    asked: list[TokenRef] = []
    ask = ClusterBlocklist._ask

    async def counted(self: ClusterBlocklist, ref: TokenRef) -> Verdict:
        asked.append(ref)
        return await ask(self, ref)

    monkeypatch.setattr(ClusterBlocklist, "_ask", counted)
    refs = [new_ref() for _ in range(12)]  # users of several groups, so of several primaries
    for ref in refs:
        assert await kept(worker, ref) is Verdict.VALID
    calls = len(asked)
    for _ in range(20):
        for ref in refs:
            assert await worker.check(ref) is Verdict.VALID
    assert len(asked) == calls
    await asyncio.wrap_future(other.add(revocations_of(refs[0])[:1]))
    assert await worker.check(refs[0]) is Verdict.REVOKED
    for ref in refs[1:]:
        assert await worker.check(ref) is Verdict.VALID
    assert len(asked) == calls + 1


async def test_a_kept_client_goes_once_its_change_is_announced_on_a_cluster(
    workers: Workers,
) -> None:
    worker, other = workers
    subjects = [(CLIENT, f"client-{n}") for n in range(12)]  # of several groups and primaries
    for subject in subjects:
        deadline = time.monotonic() + 5
        while (recalled := worker.recall(subject))[0] is None:
            recalled[1](f"record of {subject[1]}")  # kept once the node's feed subscribed
            assert time.monotonic() < deadline, "the value was never kept"
            await asyncio.sleep(WINDOW / 4)
    await asyncio.wrap_future(other.announce(subjects[:1]))
    assert worker.recall(subjects[0])[0] is None
    for subject in subjects[1:]:
        assert worker.recall(subject)[0] == f"record of {subject[1]}"


@pytest.mark.fault
@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("acknowledged", [False, True], ids=["window", "acks"])
async def test_no_worker_accepts_a_token_once_its_revocation_returned_on_a_cluster(
    workers: Workers, acking_workers: Workers, kind: Kind, acknowledged: bool
) -> None:
    """The guarantee, raced: one worker checks without pause while another revokes.

    The writer either never checks (it hears no acknowledgement and waits the window),
    or checks too, with a long window: then its revocation returns on acknowledgements.
    """
    worker, other = acking_workers if acknowledged else workers
    index = list(Kind).index(kind)
    for _ in range(10):
        ref = new_ref()
        assert await kept(worker, ref) is Verdict.VALID
        if acknowledged:
            assert await asyncio.wrap_future(other.kept(ref)) is Verdict.VALID
        started = time.monotonic()
        returned = other.add([revocations_of(ref)[index]])
        while True:
            time.sleep(random.uniform(0, WINDOW))
            done = returned.done()  # from here on, only REVOKED may come back
            verdict = await worker.check(ref)
            if done:
                assert verdict is Verdict.REVOKED
                break
            await asyncio.sleep(0)
        returned.result()
        if acknowledged:
            assert time.monotonic() - started < ACK_WINDOW / 2, "not acknowledged"


async def timed_add(blocklist: ClusterBlocklist, entries: list[Entry]) -> float:
    """Seconds blocklist.add(entries) took to return."""
    started = time.monotonic()
    await blocklist.add(entries)
    return time.monotonic() - started


@pytest.mark.fault
async def test_a_revocation_returns_once_every_subscriber_acknowledged_on_a_cluster(
    acking_workers: Workers, shared_cluster: RedisClusterGroup
) -> None:
    worker, other = acking_workers
    # Users of every primary: each write goes to its group's node and is acknowledged there.
    refs = [new_ref() for _ in range(12)]
    for ref in refs:
        assert await kept(worker, ref) is Verdict.VALID
        assert await asyncio.wrap_future(other.kept(ref)) is Verdict.VALID
    homes = {shared_cluster.port_of_key(worker.key(group_of(ref.sub), "ready")) for ref in refs}
    assert len(homes) > 1
    took = []
    for ref in refs[:6]:
        took.append(await timed_add(worker, revocations_of(ref)[:1]))
    for ref in refs[6:]:
        started = time.monotonic()
        await asyncio.wrap_future(other.add(revocations_of(ref)[1:2]))  # this loop acknowledges
        took.append(time.monotonic() - started)
    for ref in refs:
        assert await worker.check(ref) is Verdict.REVOKED
        assert await asyncio.wrap_future(other.kept(ref)) is Verdict.REVOKED
    print(f"\nrevocations acknowledged by both workers returned in {max(took):.3f} s at most")
    assert max(took) < ACK_WINDOW / 4

    # One write for users of several primaries: a transaction and acknowledgements on each.
    several = [new_ref() for _ in range(6)]
    for ref in several:
        assert await kept(worker, ref) is Verdict.VALID
        assert await asyncio.wrap_future(other.kept(ref)) is Verdict.VALID
    entries = [revocations_of(ref)[0] for ref in several]
    assert await timed_add(worker, entries) < ACK_WINDOW / 4
    for ref in several:
        assert await worker.check(ref) is Verdict.REVOKED
        assert await asyncio.wrap_future(other.kept(ref)) is Verdict.REVOKED

    # A subscriber that never acknowledges (stalled, or older code) is counted by SPUBLISH:
    # the writer waits for it, the window and no longer.
    ref = new_ref()
    assert await kept(worker, ref) is Verdict.VALID
    channel = worker.key(group_of(ref.sub), "revoked")
    silent = redis.Redis(host="127.0.0.1", port=shared_cluster.port_of_key(channel))
    pubsub = silent.pubsub()
    try:
        pubsub.ssubscribe(channel)
        assert pubsub.get_message(timeout=1)["type"] == "ssubscribe"
        waited = await timed_add(worker, revocations_of(ref)[:1])
        print(f"with a subscriber that never acknowledges: {waited:.3f} s")
        assert ACK_WINDOW <= waited < ACK_WINDOW * 1.5
        assert await worker.check(ref) is Verdict.REVOKED
    finally:
        pubsub.close()
        silent.close()

    # A writer that never checks (a command) hears no acknowledgement: it waits the window.
    command = keeping(shared_cluster.url, worker.prefix, ACK_WINDOW)
    try:
        assert await timed_add(command, revocations_of(new_ref())[:1]) >= ACK_WINDOW
    finally:
        await command.close()


async def status(http: httpx.AsyncClient, token: str) -> int:
    """The protected resource's answer to this access token."""
    response = await http.get("/api/hello", headers={"Authorization": f"Bearer {token}"})
    return response.status_code


def on_cluster(settings: Settings, cluster: RedisClusterGroup, tmp_path: Path) -> Settings:
    """The service's settings on this cluster, with the run's database and secrets."""
    return settings_beside(settings, tmp_path, redis_url=cluster.url, redis_prefix=PREFIX)


def primary_of(cluster: RedisClusterGroup, session: Session) -> int:
    """The port of the primary that holds the group of the session's user now."""
    return cluster.port_of_key(f"{PREFIX}{{{group_tags()[group_of(sub_of(session))]}}}ready")


async def users_on_every_primary(
    http: httpx.AsyncClient, cluster: RedisClusterGroup, per_primary: int
) -> dict[int, list[Session]]:
    """A first session of new users, per_primary of them on each primary, by its port."""
    found: dict[int, list[Session]] = {port: [] for port in cluster.primaries()}
    for _ in range(100):
        if all(len(sessions) >= per_primary for sessions in found.values()):
            return found
        session = await login(http, await register(http, PASSWORD), PASSWORD)
        sessions = found[primary_of(cluster, session)]
        if len(sessions) < per_primary:
            sessions.append(session)
    raise AssertionError(f"users did not spread over the primaries: {found}")


@pytest.mark.fault
async def test_revocations_hold_on_a_cluster_and_through_a_primary_failover(
    settings: Settings,
    database_url: str,
    cluster: RedisClusterGroup,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    captured_app: list[Flask],
) -> None:
    async with serve_in_process(on_cluster(settings, cluster, tmp_path)) as http:
        store = get_store_of(captured_app[-1])
        # The primary that holds slot 0 is the one the client asks first when it relearns
        # the cluster's layout: its failure is the hardest on the other primaries' users.
        home = cluster.port_of_slot(0)
        early = (await users_on_every_primary(http, cluster, 1))[home][0]
        username = early.username
        late, kept = [await login(http, username, PASSWORD) for _ in range(2)]
        group = group_of(sub_of(kept))
        assert await status(http, early.access) == 200
        assert (await http.post("/auth/logout", headers=early.bearer())).status_code == 204
        assert await status(http, early.access) == 401
        assert await status(http, kept.access) == 200
        assert (await http.post("/auth/logout", headers=late.bearer())).status_code == 204
        assert await status(http, late.access) == 401
        # The durable record knows whose tokens each logout covers, and so their group.
        with psycopg.connect(database_url, autocommit=True) as conn:
            recorded = conn.execute(
                "SELECT count(*), min(user_group), max(user_group) FROM revocations "
                "WHERE kind = 'session' AND user_id = %s",
                (sub_of(kept),),
            ).fetchone()
        assert recorded == (2, group, group)

        # Another user whose group lives on another primary.
        for _ in range(20):
            other_name = await register(http, PASSWORD)
            other = await login(http, other_name, PASSWORD)
            if primary_of(cluster, other) != home:
                break
        else:
            raise AssertionError("every user landed on one primary")
        assert await status(http, other.access) == 200

        caplog.set_level(logging.INFO, logger="service.store")
        caplog.clear()
        cluster.kill(home)
        killed = time.monotonic()
        # The worker's verification is the first to find the node gone, before any check.
        with contextlib.suppress(BlocklistUnavailable):
            await on_loop(store, store.verify())
        unavailable: dict[str, list[float]] = {"home": [], "other": []}
        recovered = None
        while recovered is None or time.monotonic() - recovered < 2.0:
            assert time.monotonic() - killed < 40, "the service never recovered"
            for revoked in (early, late):
                assert await status(http, revoked.access) in {401, 503}, (
                    "a revoked token was accepted during the failover"
                )
            now = time.monotonic() - killed
            # At once, as concurrent clients ask: a command failing on the dead node must
            # not fail those under way on the live ones.
            home_answer, ready, *other_answers = await asyncio.gather(
                status(http, kept.access),
                http.get("/readyz"),  # probes a random group: a third of them are the dead's
                *(status(http, other.access) for _ in range(4)),
            )
            assert ready.status_code in {200, 503}
            answers = {"home": home_answer, "other": max(other_answers)}
            for name, answer in answers.items():
                assert answer in {200, 503}
                if answer == 503:
                    unavailable[name].append(now)
            if answers["home"] == 503:
                assert recovered is None, f"503 again {now - recovered:.2f} s after recovering"
            elif recovered is None and unavailable["home"]:
                recovered = now
            await asyncio.sleep(0.02)

        assert home not in cluster.primaries()
        assert unavailable["home"], "the failover went unnoticed"
        # Doubts and breakers are per group and per node: the other primary's users are
        # checked as usual through the failover. A check of theirs that itself fails (a
        # timeout on a loaded machine) costs them a breaker's and a recovery's time at
        # most, not the failover's.
        assert brief(unavailable["other"]), f"503 for a user of a live primary: {unavailable}"
        for name, moments in unavailable.items():
            window = f"from {moments[0]:.2f} s to {moments[-1]:.2f} s" if moments else "never"
            print(
                f"\n{name} user's primary {'killed' if name == 'home' else 'alive'}: 503 {window}"
            )
        print(f"home user's checks answered 200 again {recovered:.2f} s after the kill")
        # The promoted replica answered with another run_id: its groups were reloaded from
        # the durable record, and only those.
        loaded = reloads(caplog)
        assert loaded, caplog.text
        print(f"reloads after the failover (groups, seconds): {loaded}")
        assert all(int(groups) < GROUPS for groups, _ in loaded)

        for revoked in (early, late):
            assert await status(http, revoked.access) == 401
        assert (await http.post("/auth/logout", headers=kept.bearer())).status_code == 204
        assert await status(http, kept.access) == 401
        assert await status(http, other.access) == 200
        assert (await login(http, username, PASSWORD)).access


@pytest.mark.fault
async def test_recovery_clears_the_doubts_of_groups_whose_node_answers(
    settings: Settings,
    cluster: RedisClusterGroup,
    tmp_path: Path,
    captured_app: list[Flask],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node that does not answer keeps its own groups doubted, and only those."""
    async with serve_in_process(on_cluster(settings, cluster, tmp_path)) as http:
        store = get_store_of(captured_app[-1])
        blocklist = store.blocklist
        assert isinstance(blocklist, ClusterBlocklist)
        users = await users_on_every_primary(http, cluster, 1)
        (silent_port, [silent]), (_, [live]) = list(users.items())[:2]
        tag = group_tags()
        silent_groups = {
            group
            for group in range(GROUPS)
            if cluster.port_of_key(f"{PREFIX}{{{tag[group]}}}ready") == silent_port
        }
        assert group_of(sub_of(silent)) in silent_groups
        assert group_of(sub_of(live)) not in silent_groups

        # One check of each user fails: each one's group is doubted.
        async def unavailable(_ref: TokenRef) -> Verdict:
            raise BlocklistUnavailable("blocklist unreachable: in this test")

        with monkeypatch.context() as failing:
            failing.setattr(blocklist, "known", lambda _ref: None)
            failing.setattr(blocklist, "check", unavailable)
            for user in (silent, live):
                assert await status(http, user.access) == 503
        # The silent node's groups cannot be read; the others can.
        read_states = blocklist.group_states

        async def without_silent_node() -> list[State | None]:
            states = await read_states()
            return [None if group in silent_groups else s for group, s in enumerate(states)]

        monkeypatch.setattr(blocklist, "group_states", without_silent_node)
        assert await on_loop(store, store.recover()) is False
        assert await status(http, live.access) == 200
        assert await status(http, silent.access) == 503
        monkeypatch.setattr(blocklist, "group_states", read_states)
        assert await on_loop(store, store.recover()) is True
        assert await status(http, silent.access) == 200


@pytest.mark.fault
async def test_no_revoked_token_gets_in_while_a_group_moves_to_another_primary(
    settings: Settings,
    cluster: RedisClusterGroup,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Resharding: a group's slot and its keys move to another primary, under checks.

    A logout sent while its keys are half moved is in force from its answer on, and the
    group answers again from the new primary once it has been reloaded there.
    """
    async with serve_in_process(on_cluster(settings, cluster, tmp_path)) as http:
        username = await register(http, PASSWORD)
        revoked, during, kept = [await login(http, username, PASSWORD) for _ in range(3)]
        assert (await http.post("/auth/logout", headers=revoked.bearer())).status_code == 204
        slot = key_slot(group_tags()[group_of(sub_of(kept))].encode())
        home = cluster.port_of_slot(slot)
        target = next(port for port in cluster.primaries() if port != home)
        elsewhere = (await users_on_every_primary(http, cluster, 1))[target][0]
        assert await status(http, kept.access) == 200

        caplog.set_level(logging.INFO, logger="service.store")
        caplog.clear()
        move = asyncio.create_task(
            asyncio.to_thread(cluster.move_slot, slot, target, batch=1, pause=0.3)
        )
        started = time.monotonic()
        answers: Counter[tuple[str, int]] = Counter()
        revoked_during: float | None = None
        recovered: float | None = None
        unavailable: list[float] = []
        refused: list[float] = []  # the other group's user's 503s (see the failover test)
        while recovered is None or time.monotonic() - recovered < STABLE:
            now = time.monotonic() - started
            assert now < 40, f"the service never recovered: {dict(answers)}"
            if revoked_during is None and now > 0.5:
                logout = await http.post("/auth/logout", headers=during.bearer())
                assert logout.status_code in {202, 204}, logout.text
                answers[("logout", logout.status_code)] += 1
                revoked_during = now
            for name, session in (("revoked", revoked), ("during", during)):
                if name == "revoked" or revoked_during is not None:
                    answer = await status(http, session.access)
                    assert answer in {401, 503}, f"{name}'s revoked token accepted at {now:.2f} s"
                    answers[(name, answer)] += 1
            # A user of another group, on the slot's new primary: the doubt and the breaker
            # are about the moving group and its node, not about theirs.
            other = await status(http, elsewhere.access)
            assert other in {200, 503}
            answers[("elsewhere", other)] += 1
            if other == 503:
                refused.append(now)
            answer = await status(http, kept.access)
            assert answer in {200, 503}
            answers[("kept", answer)] += 1
            if answer == 503:
                unavailable.append(now)
            if answer == 503 or not move.done():
                recovered = None
            elif recovered is None:
                recovered = time.monotonic()
            await asyncio.sleep(0.02)
        await move
        assert cluster.port_of_slot(slot) == target
        assert brief(refused), f"a user of another group refused at {refused} s"
        print(f"\nanswers while the group moved and after: {dict(answers)}")
        if unavailable:
            print(f"the group's checks: 503 from {unavailable[0]:.2f} s to {unavailable[-1]:.2f} s")
        print(f"reloads (groups, seconds): {reloads(caplog)}")
        for session in (revoked, during):
            assert await status(http, session.access) == 401
        assert (await http.post("/auth/logout", headers=kept.bearer())).status_code == 204
        assert await status(http, kept.access) == 401


async def on_loop(store: Store, job: Coroutine[Any, Any, T]) -> T:
    """Run job on the loop that owns the store's connections, and wait for it."""
    return await asyncio.wrap_future(store.loop.submit(job))


def get_store_of(app: Flask) -> Store:
    """The store of an app serve_in_process built."""
    store: Store = app.extensions["store"]
    return store


def brief(moments: list[float]) -> bool:
    """Whether 503s seen at these moments (seconds) all fall within one second, if any."""
    return not moments or moments[-1] - moments[0] < 1.0


def reloads(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """The loads from the durable record logged so far: (groups, seconds)."""
    return re.findall(r"durable record into (\d+) groups in ([0-9.]+) s", caplog.text)


STABLE = 2.0  # seconds of 200s after the last 503 that count as recovered
# Seconds between one logout's answer and the next: a 204 takes milliseconds, and the
# prepared sessions must last from before the kill until the service has recovered.
LOGOUT_PACE = 0.1


@dataclass(eq=False)
class Token:
    """An access token the test follows, and where its logout stands."""

    session: Session
    primary: int  # the port of its group's primary when the test began
    kept: bool = False  # never logged out
    leaving: bool = False  # its logout was sent
    revoked_at: float | None = None  # when the logout answered 204 or 202
    revoked_by: int = 0  # which of the two


@dataclass
class Watch:
    """Probe tokens without pause; keep what valid ones answered and each answer not allowed.

    A token is revoked from the moment its logout answered 204 or 202: from then on only
    401 or 503 may come back. One whose logout was not yet sent may answer 200 or 503.
    """

    http: httpx.AsyncClient
    tokens: list[Token]
    valid: list[tuple[float, Token, int]] = field(default_factory=list)
    latest: dict[Token, int] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)
    revoked_probes: int = 0
    accepted: int = 0  # revoked tokens answered 200
    origin: float = field(default_factory=time.monotonic)  # of the times in wrong

    async def run(self, stop: asyncio.Event) -> None:
        """Probe every token in turn (the never logged out first) until stop is set."""
        ordered = sorted(self.tokens, key=lambda token: not token.kept)
        while not stop.is_set():
            for token in ordered:
                await self._probe(token)
            await asyncio.sleep(0)

    async def _probe(self, token: Token) -> None:
        revoked, leaving = token.revoked_at is not None, token.leaving
        answer = await status(self.http, token.session.access)
        if revoked:
            self.revoked_probes += 1
            self.accepted += answer == 200
            allowed = {401, 503}
        elif leaving or token.leaving:  # its logout is under way: either answer is right
            allowed = {200, 401, 503}
        else:
            self.valid.append((time.monotonic(), token, answer))
            self.latest[token] = answer
            allowed = {200, 503}
        if answer not in allowed:
            self.wrong.append(self._describe(token, answer))

    def _describe(self, token: Token, answer: int) -> str:
        state = "valid"
        if token.revoked_at is not None:
            state = f"logged out ({token.revoked_by} at {token.revoked_at - self.origin:.2f} s)"
        moment = time.monotonic() - self.origin
        return f"{state} token of primary {token.primary} answered {answer} at {moment:.2f} s"

    def last_unavailable(self) -> float | None:
        """When a valid token last answered 503."""
        return max((at for at, _, answer in self.valid if answer == 503), default=None)

    def recovered_for(self, seconds: float) -> bool:
        """Whether, after some 503, every kept token answers 200 and none 503 for so long."""
        last = self.last_unavailable()
        kept = [token for token in self.tokens if token.kept]
        return (
            last is not None
            and time.monotonic() - last >= seconds
            and all(self.latest.get(token) == 200 for token in kept)
        )

    async def until_recovered(self, since: float, tasks: list[asyncio.Task[None]]) -> float:
        """Wait until recovered for STABLE seconds (30 at most); how long after since 200 came."""
        while not self.recovered_for(STABLE):
            assert time.monotonic() - since < 30, f"the service never recovered: {self.latest}"
            for task in tasks:
                if task.done():
                    task.result()  # raises what went wrong there
            await asyncio.sleep(0.05)
        last = self.last_unavailable()
        assert last is not None
        back = min(at for at, _, answer in self.valid if answer == 200 and at > last)
        return back - since

    def unavailable(self, since: float, primaries: Container[int] | None = None) -> str:
        """When valid tokens (of users on these primaries) answered 503, after since."""
        moments = [
            at - since
            for at, token, answer in self.valid
            if answer == 503 and (primaries is None or token.primary in primaries)
        ]
        if not moments:
            return "never"
        return f"{moments[-1] - moments[0]:.2f} s ({moments[0]:.2f}-{moments[-1]:.2f} s)"


async def log_out(
    http: httpx.AsyncClient,
    tokens: list[Token],
    answers: list[tuple[float, Token, int]],
    stop: asyncio.Event,
) -> None:
    """Log each token's session out in turn until stop is set; a 503 is retried until 204/202."""
    for token in tokens:
        if stop.is_set():
            return
        token.leaving = True
        while True:
            response = await http.post("/auth/logout", headers=token.session.bearer())
            answers.append((time.monotonic(), token, response.status_code))
            if response.status_code in {202, 204}:
                token.revoked_at, token.revoked_by = time.monotonic(), response.status_code
                break
            assert response.status_code == 503, response.text
            await asyncio.sleep(0.05)
        await asyncio.sleep(LOGOUT_PACE)


async def stopped(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    """Set stop and wait for the tasks (cancelling those that do not heed it)."""
    stop.set()
    done, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.cancel()
    for task in done:
        task.result()


@pytest.mark.fault
async def test_no_revoked_token_gets_in_while_a_primary_dies_under_logouts(
    settings: Settings,
    cluster: RedisClusterGroup,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A primary SIGKILLed while sessions are logged out and every token probed, without pause."""
    async with serve_in_process(on_cluster(settings, cluster, tmp_path)) as http:
        users = await users_on_every_primary(http, cluster, per_primary=2)
        victim = next(iter(users))
        kept = [
            Token(session, port, kept=True)
            for port, sessions in users.items()
            for session in sessions
        ]
        leaving = [
            Token(await login(http, user.session.username, PASSWORD), user.primary)
            for _ in range(12)
            for user in kept  # users take turns, so logouts hit every primary
        ]
        for token in [*kept, *leaving]:
            assert await status(http, token.session.access) == 200

        caplog.set_level(logging.INFO, logger="service.store")
        caplog.clear()
        watch = Watch(http, [*kept, *leaving])
        logouts: list[tuple[float, Token, int]] = []
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(watch.run(stop)),
            asyncio.create_task(log_out(http, leaving, logouts, stop)),
        ]
        try:
            while len(logouts) < 3:  # some revoked before the kill
                assert not tasks[1].done(), tasks[1].result()
                await asyncio.sleep(0.05)
            killed = watch.origin = time.monotonic()
            cluster.kill(victim)
            recovered = await watch.until_recovered(killed, tasks)
        finally:
            await stopped(stop, tasks)

        assert victim not in cluster.primaries()
        assert watch.wrong == [], (victim, watch.wrong[:10])
        assert watch.accepted == 0
        during = Counter(
            (token.primary == victim, answer)
            for at, token, answer in logouts
            if killed <= at <= killed + recovered
        )
        assert during, "no logout was answered during the failover"
        assert not all(token.leaving for token in leaving), "the prepared sessions ran out"
        others = set(users) - {victim}

        def answered(on_victim: bool) -> str:
            counts = (f"{during[on_victim, code]} x {code}" for code in (204, 202, 503))
            return ", ".join(counts)

        print(
            f"\nfault table | primary SIGKILLed during logouts | 200 again {recovered:.2f} s "
            f"after the kill | 503s: killed primary's users {watch.unavailable(killed, {victim})}"
            f", others' {watch.unavailable(killed, others)} | revoked tokens accepted: "
            f"{watch.accepted} of {watch.revoked_probes} probes | logouts answered during the "
            f"failover (503s retried): killed primary's users {answered(True)}; others' "
            f"{answered(False)} | reloads (groups, s): {reloads(caplog)}"
        )
        # Afterwards: every revoked token refused, every other one accepted, logouts in force.
        for token in [*kept, *leaving]:
            expected = 401 if token.revoked_at is not None else 200
            assert await status(http, token.session.access) == expected
        last = kept[0]
        assert (await http.post("/auth/logout", headers=last.session.bearer())).status_code == 204
        assert await status(http, last.session.access) == 401


@pytest.mark.fault
async def test_no_revoked_token_gets_in_while_the_whole_cluster_restarts_empty(
    settings: Settings,
    cluster: RedisClusterGroup,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every node killed and a new, empty cluster made on the same ports: PostgreSQL refills it."""
    async with serve_in_process(on_cluster(settings, cluster, tmp_path)) as http:
        users = await users_on_every_primary(http, cluster, per_primary=1)
        tokens = [
            Token(await login(http, first.username, PASSWORD), port)
            for port, sessions in users.items()
            for first in sessions
            for _ in range(3)
        ]
        # Each user logs one session out; the first user also logs out everywhere.
        for token in tokens[::3]:
            response = await http.post("/auth/logout", headers=token.session.bearer())
            assert response.status_code == 204
            token.revoked_at = time.monotonic()
        everywhere = tokens[1]
        response = await http.post("/auth/logout-all", headers=everywhere.session.bearer())
        assert response.status_code == 204
        for token in tokens[:3]:
            token.revoked_at = token.revoked_at or time.monotonic()
        for token in tokens:
            token.kept = token.revoked_at is None
            assert await status(http, token.session.access) == (200 if token.kept else 401)

        caplog.set_level(logging.INFO, logger="service.store")
        caplog.clear()
        watch = Watch(http, tokens)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(watch.run(stop))]
        try:
            await asyncio.sleep(0.2)
            down = watch.origin = time.monotonic()
            await asyncio.to_thread(cluster.restart_empty)
            healthy = time.monotonic() - down
            rebuilt = await watch.until_recovered(down, tasks)
        finally:
            await stopped(stop, tasks)

        assert watch.wrong == [], watch.wrong[:10]
        assert watch.accepted == 0
        loaded = reloads(caplog)
        assert loaded, caplog.text
        print(
            f"\nfault table | whole cluster restarted empty (SIGKILL, new nodes on the same "
            f"ports) | 200 again {rebuilt:.2f} s after the kill (every replica synced after "
            f"{healthy:.2f} s) | 503s: {watch.unavailable(down)} | revoked tokens accepted: "
            f"{watch.accepted} of {watch.revoked_probes} probes | reloads (groups, s): {loaded}"
        )
        for token in tokens:
            assert await status(http, token.session.access) == (200 if token.kept else 401)
        again = await login(http, everywhere.session.username, PASSWORD)
        assert await status(http, again.access) == 200


@pytest.mark.fault
async def test_a_load_that_fails_gives_every_group_lock_back(
    shared_cluster: RedisClusterGroup,
) -> None:
    """The next recovery loads every group at once, rather than after REBUILD_LOCK_SECONDS."""
    worker = keeping(shared_cluster.url, f"lock{random.randrange(1 << 30)}:")
    try:
        revoked = new_ref()
        entry = revocations_of(revoked)[0]
        with pytest.raises(RecordUnreadable):
            await worker.rebuild(failing_midway(entry))
        assert not any(state and state.loaded for state in await worker.group_states())
        assert await worker.rebuild(durable(entry))
        assert await worker.check(revoked) is Verdict.REVOKED
    finally:
        await worker.close()


CLUSTER_ACL = re.compile(
    r"On a Redis Cluster the same user needs, on every node, also:\s*`([^`]+)`"
)


@pytest.mark.fault
async def test_the_documented_acl_with_its_cluster_rights_is_enough(
    shared_cluster: RedisClusterGroup,
) -> None:
    found = CLUSTER_ACL.search(README.read_text())
    assert found, "the README gives no Cluster rights"
    prefix = f"acl{random.randrange(1 << 30)}:"
    rights = for_user([*documented_acl(), *found[1].split()], "authsvc-c", "pw-c", prefix)
    for port in shared_cluster.ports:
        admin = redis.Redis(host="127.0.0.1", port=port)
        try:
            admin.execute_command(*rights)
        finally:
            admin.close()
    url = shared_cluster.url.replace("redis+cluster://", "redis+cluster://authsvc-c:pw-c@")
    worker = keeping(url, prefix)
    try:
        assert await worker.rebuild(durable())
        ref = new_ref()
        assert await kept(worker, ref) is Verdict.VALID  # the sharded feed subscribed
        await worker.add(revocations_of(ref)[:1])
        assert await worker.check(ref) is Verdict.REVOKED
        assert all(state.loaded for state in await worker.group_states())
    finally:
        await worker.close()

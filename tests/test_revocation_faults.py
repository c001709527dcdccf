"""Revocations never come back: Redis going back in time, outages, rights it lacks, recovery."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import redis

from service.config import Settings
from service.loop import WorkerLoop
from service.store import Store
from service.store.blocklist import BlocklistUnavailable, TokenRef, Verdict
from service.store.migrate import upgrade
from tests.conftest import (
    Session,
    acl_user,
    fresh_database,
    login,
    make_settings,
    register,
    serve_in_process,
    settings_beside,
    wait_for_status,
)
from tests.proxy import TcpProxy
from tests.servers import SnapshottingRedis

pytestmark = pytest.mark.fault

PASSWORD = "correct horse battery"


@pytest.fixture
def two_redis(tmp_path: Path) -> Iterator[tuple[SnapshottingRedis, SnapshottingRedis]]:
    """Two private Redis servers: the one the service uses, and a standby."""
    servers = []
    for name in ("primary", "standby"):
        (tmp_path / name).mkdir()
        server = SnapshottingRedis(tmp_path / name)
        server.start()
        servers.append(server)
    yield servers[0], servers[1]
    for server in servers:
        server.stop()


def replicate(replica: SnapshottingRedis, source: SnapshottingRedis) -> None:
    """Make replica a copy of source (a full resync), then promote it."""
    client = redis.Redis.from_url(replica.url)
    try:
        client.replicaof("127.0.0.1", source.port)
        deadline = time.monotonic() + 10
        while client.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.05)
        client.replicaof("NO", "ONE")
    finally:
        client.close()


async def sessions(http: httpx.AsyncClient, count: int) -> list[Session]:
    """count logins of one new user."""
    username = await register(http, PASSWORD)
    return [await login(http, username, PASSWORD) for _ in range(count)]


async def refused(http: httpx.AsyncClient, session: Session) -> bool:
    """Whether the access token is refused now; a 200 fails the test."""
    status = (await http.get("/api/hello", headers=session.bearer())).status_code
    assert status in {401, 503}, "a revoked token was accepted"
    return status == 401


async def test_a_redis_that_resyncs_from_an_older_copy_gives_back_no_revocation(
    settings: Settings,
    two_redis: tuple[SnapshottingRedis, SnapshottingRedis],
    tmp_path: Path,
) -> None:
    primary, standby = two_redis
    # Without kept verdicts every check asks Redis: what Redis holds decides.
    own = settings_beside(
        settings,
        tmp_path,
        redis_url=primary.url,
        redis_prefix="older-copy:",
        revocation_propagation_ms=0,
    )
    async with serve_in_process(own) as http:
        leaving = await sessions(http, 6)
        staying = await sessions(http, 1)
        replicate(standby, primary)  # the standby's copy predates the logouts below
        for session in leaving:
            assert (await http.post("/auth/logout", headers=session.bearer())).status_code == 204
        replicate(primary, standby)  # the primary goes back to that copy, its run id kept
        deadline = time.monotonic() + 10
        while not all([await refused(http, session) for session in leaving]):
            assert time.monotonic() < deadline, "the blocklist was never reloaded"
            await asyncio.sleep(0.05)
        await wait_for_status(http, staying[0].bearer(), 200)
        assert (await http.get("/readyz")).status_code == 200
    # A worker started afterwards has seen no number: PostgreSQL's record tells it.
    replicate(primary, standby)
    async with serve_in_process(own) as fresh:
        for session in leaving:
            assert await refused(fresh, session)


async def test_a_logout_during_a_redis_outage_is_recorded_and_in_force_on_return(
    settings: Settings, tmp_path: Path
) -> None:
    upstream = urlsplit(str(settings.redis_url))
    proxies = [TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 6379) for _ in "ab"]
    apps = []
    for index, proxy in enumerate(proxies):
        proxy.start()
        apps.append(
            serve_in_process(
                settings_beside(
                    settings,
                    tmp_path / str(index),
                    redis_url=f"redis://127.0.0.1:{proxy.port}{upstream.path or '/0'}",
                    redis_timeout=0.3,
                )
            )
        )
    try:
        one, two = [await app.__aenter__() for app in apps]
        partitioned, outage, staying = await sessions(one, 3)
        for http in (one, two):
            assert (await http.get("/api/hello", headers=staying.bearer())).status_code == 200
        # Only the first worker loses Redis: its logout is recorded, and the other worker,
        # which still reaches Redis, puts it in force within its verification period.
        proxies[0].stop()
        answer = await one.post("/auth/logout", headers=partitioned.bearer())
        assert answer.status_code == 202, answer.text
        assert answer.json()["status"] == "recorded"
        deadline = time.monotonic() + 10
        while (await two.get("/api/hello", headers=partitioned.bearer())).status_code != 401:
            assert time.monotonic() < deadline, "the recorded logout never reached Redis"
            await asyncio.sleep(0.1)
        proxies[0].start()
        # Both lose Redis: no worker accepts the token before or after Redis returns.
        proxies[1].stop()
        proxies[0].stop()
        assert (await one.post("/auth/logout", headers=outage.bearer())).status_code == 202
        for http in (one, two):
            assert (await http.get("/api/hello", headers=staying.bearer())).status_code == 503
        for proxy in proxies:
            proxy.start()
        deadline = time.monotonic() + 10
        for http in (two, one):  # each worker recovers on its own, within its verification
            while (await http.get("/api/hello", headers=staying.bearer())).status_code != 200:
                await refused(http, outage)
                assert time.monotonic() < deadline, "the service did not recover"
                await asyncio.sleep(0.02)
        for http in (one, two):
            assert await refused(http, outage)
            assert await refused(http, partitioned)
    finally:
        for app in apps:
            await app.__aexit__(None, None, None)
        for proxy in proxies:
            proxy.close()


async def test_a_recorded_logout_is_written_back_though_a_later_one_passed_its_number(
    cut_redis: tuple[httpx.AsyncClient, TcpProxy],
) -> None:
    """Redis's seq raised past a revocation it never took must not hide it from recovery."""
    http, proxy = cut_redis
    recorded, later = [(await sessions(http, 1))[0] for _ in range(2)]
    assert (await http.get("/api/hello", headers=recorded.bearer())).status_code == 200
    proxy.stop()
    assert (await http.post("/auth/logout", headers=recorded.bearer())).status_code == 202
    proxy.start()
    # Answered before a recovery ran: Redis now holds a higher number than the first logout's.
    assert (await http.post("/auth/logout", headers=later.bearer())).status_code == 204
    deadline = time.monotonic() + 10
    while not await refused(http, recorded):
        assert time.monotonic() < deadline, "the recorded logout never reached Redis"
        await asyncio.sleep(0.05)
    for _ in range(20):  # and it stays in force
        assert await refused(http, recorded)
        await asyncio.sleep(0.1)


async def test_a_logout_recorded_by_a_worker_cut_off_from_redis_is_put_in_force_by_the_others(
    cut_redis: tuple[httpx.AsyncClient, TcpProxy], client: httpx.AsyncClient
) -> None:
    """The others write it back, though a later revocation raised Redis's seq past it."""
    cut_off, proxy = cut_redis
    recorded, later = [(await sessions(client, 1))[0] for _ in range(2)]
    for http in (cut_off, client):
        assert (await http.get("/api/hello", headers=recorded.bearer())).status_code == 200
    proxy.stop()
    assert (await cut_off.post("/auth/logout", headers=recorded.bearer())).status_code == 202
    # Another worker's logout reaches Redis: Redis's seq now passes the recorded one's.
    assert (await client.post("/auth/logout", headers=later.bearer())).status_code == 204
    started = time.monotonic()
    while (await client.get("/api/hello", headers=recorded.bearer())).status_code != 401:
        assert time.monotonic() - started < 10, "the recorded logout never reached Redis"
        await asyncio.sleep(0.05)
    print(f"\nin force on the other worker {time.monotonic() - started:.2f} s after")
    # ...while the worker that recorded it still cannot reach Redis, and for good.
    assert (await cut_off.get("/api/hello", headers=recorded.bearer())).status_code == 503
    for _ in range(10):
        assert await refused(client, recorded)
        await asyncio.sleep(0.1)


async def test_readyz_fails_when_the_redis_user_may_not_run_the_check(
    settings: Settings, prefix: str, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    session = (await sessions(client, 1))[0]
    with acl_user(settings, prefix, without=("+evalsha",)) as url:
        own = settings_beside(settings, tmp_path, redis_url=url, redis_prefix=prefix)
        async with serve_in_process(own) as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["blocklist"] == "down"
            assert (await http.get("/api/hello", headers=session.bearer())).status_code == 503


async def test_service_recovers_within_a_second_of_redis_returning(
    cut_redis: tuple[httpx.AsyncClient, TcpProxy],
) -> None:
    http, proxy = cut_redis
    users = await sessions(http, 8)

    async def me(session: Session) -> int:
        return (await http.get("/auth/me", headers=session.bearer())).status_code

    for _ in range(3):
        assert set(await asyncio.gather(*map(me, users))) == {200}
    proxy.stop()  # every connection is cut; the pool learns it only when it next uses one
    # Verdicts kept moments ago may still answer until the feed sees its connection go.
    deadline = time.monotonic() + 5
    while await me(users[0]) != 503:
        assert time.monotonic() < deadline, "the cut went unnoticed"
        await asyncio.sleep(0.01)
    proxy.start()
    back = time.monotonic()
    while set(await asyncio.gather(*map(me, users))) != {200}:
        assert time.monotonic() - back < 1.5, "stale connections held the service at 503"
        await asyncio.sleep(0.02)


async def test_a_redis_restart_during_a_load_starts_the_load_over(
    postgres_server: str, snapshotting_redis: SnapshottingRedis, tmp_path: Path
) -> None:
    count = 40_000
    with fresh_database(postgres_server) as database:
        own = make_settings(
            tmp_path,
            database_url=database,
            redis_url=snapshotting_redis.url,
            redis_prefix="load:",
            revocation_propagation_ms=0,
        )
        await asyncio.to_thread(upgrade, own)
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO revocations (kind, subject, expires_at, created_at) "
                "SELECT 'session', 's' || i, now() + interval '1 day', now() "
                "FROM generate_series(1, %s) AS i",
                (count,),
            )
        store = Store(own, WorkerLoop())
        direct = redis.Redis.from_url(snapshotting_redis.url)
        try:
            loading = asyncio.ensure_future(store.recover())
            while not direct.keys("load:s:*"):
                assert not loading.done(), "the load ended before Redis could restart"
                await asyncio.sleep(0.005)
            snapshotting_redis.crash()  # an empty Redis comes back mid-load
            snapshotting_redis.start()
            with contextlib.suppress(BlocklistUnavailable):
                assert not await loading
            assert not (await store.blocklist.state()).loaded
            assert await store.recover()
            loaded = sum(direct.hlen(key) for key in direct.scan_iter("load:s:*", count=1000))
            assert loaded == count
            with psycopg.connect(database) as conn:
                row = conn.execute(
                    "SELECT extract(epoch FROM expires_at)::bigint FROM revocations "
                    "WHERE subject = 's1'"
                ).fetchone()
            assert row is not None
            anyone = TokenRef(jti="x", exp=row[0], sid="s1", sxp=row[0], sub="x")
            assert await store.check(anyone) is Verdict.REVOKED
        finally:
            direct.close()
            await store.close()

"""Revocation semantics on the real Redis: TTLs, durability, outages, and round trips."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis
import redis.asyncio.connection as aredis_connection

from service.config import Settings
from service.ids import new_id
from service.store import Store
from service.store.blocklist import BlocklistUnavailable, Entry, Kind, RedisBlocklist
from tests.conftest import (
    Session,
    delete_prefix,
    fresh_database,
    serve_in_process,
    settings_beside,
    two_sessions,
    wait_for_status,
)
from tests.proxy import TcpProxy


def claims_of(token: str) -> dict[str, int | str]:
    """Unverified claims of a token the service issued."""
    return jwt.decode(token, options={"verify_signature": False})


def redis_client(settings: Settings) -> redis.Redis:
    """A plain client on the test Redis."""
    return redis.Redis.from_url(str(settings.redis_url))


def blocklist_of(settings: Settings) -> RedisBlocklist:
    """A blocklist object with the app's layout, to compute key names."""
    return RedisBlocklist(
        str(settings.redis_url),
        prefix=settings.redis_prefix,
        shards=settings.revocation_shards,
        bucket_seconds=settings.revocation_bucket_seconds,
        session_bucket_seconds=settings.revocation_session_bucket_seconds,
        timeout=1,
        max_connections=2,
    )


async def test_session_entry_lives_until_the_session_ends(
    client: httpx.AsyncClient, user: Session, settings: Settings
) -> None:
    claims = claims_of(user.access)
    assert (await client.post("/auth/logout", headers=user.bearer())).status_code == 204
    key = blocklist_of(settings).bucket_key(Kind.SESSION, str(claims["sid"]), int(claims["sxp"]))
    r = redis_client(settings)
    assert r.hexists(key, str(claims["sid"]))
    ttl = r.ttl(key)
    remaining = int(claims["sxp"]) - time.time()
    # Entries share a hash per time bucket: they go at most one bucket after the session.
    assert remaining - 2 <= ttl <= remaining + settings.revocation_session_bucket_seconds + 2
    r.close()


async def test_user_cutoff_lives_as_long_as_a_refresh_token(
    client: httpx.AsyncClient, user: Session, settings: Settings
) -> None:
    assert (await client.post("/auth/logout-all", headers=user.bearer())).status_code == 204
    r = redis_client(settings)
    key = blocklist_of(settings).user_key(str(claims_of(user.access)["sub"]))
    assert abs(r.ttl(key) - settings.refresh_token_ttl) <= 3
    assert int(r.get(key) or 0) >= int(str(claims_of(user.access)["sid"])[:12], 16)
    r.close()


async def test_token_entries_expire_and_free_their_memory(settings: Settings) -> None:
    blocklist = RedisBlocklist(
        str(settings.redis_url),
        prefix=settings.redis_prefix + "ttl:",
        shards=4,
        bucket_seconds=1,
        timeout=1,
        max_connections=2,
    )
    now = int(time.time())
    await blocklist.add([Entry(Kind.TOKEN, f"{i:032x}", now + 1) for i in range(50)])
    r = redis_client(settings)
    assert r.keys(f"{settings.redis_prefix}ttl:r:*")
    await asyncio.sleep(3.2)
    assert r.keys(f"{settings.redis_prefix}ttl:r:*") == []
    r.close()
    await blocklist.close()


async def test_revocations_survive_losing_redis(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    revoked, kept = await two_sessions(client)
    assert (await client.post("/auth/logout", headers=revoked.bearer())).status_code == 204
    delete_prefix(str(settings.redis_url), settings.redis_prefix)  # Redis restarted empty
    first = await client.get("/api/hello", headers=kept.bearer())
    assert first.status_code in {200, 503}
    if first.status_code == 503:
        assert first.headers["retry-after"] == "1"
        assert first.headers["content-type"] == "application/problem+json"
    await wait_for_status(client, kept.bearer(), 200)  # the blocklist is rebuilt
    assert (await client.get("/api/hello", headers=revoked.bearer())).status_code == 401


async def test_redis_down_means_503_and_recovery_without_restart(
    cut_redis: tuple[httpx.AsyncClient, TcpProxy],
) -> None:
    http, proxy = cut_redis
    kept, leaving = await two_sessions(http)
    assert (await http.get("/api/hello", headers=kept.bearer())).status_code == 200
    proxy.stop()
    down = await http.get("/api/hello", headers=kept.bearer())
    assert down.status_code == 503
    assert down.headers["retry-after"]
    assert down.headers["content-type"] == "application/problem+json"
    assert "Traceback" not in down.text
    # A logout is recorded durably and says so: it is not yet in force in Redis.
    recorded = await http.post("/auth/logout", headers=leaving.bearer())
    assert recorded.status_code == 202
    assert recorded.json()["status"] == "recorded"
    assert (await http.get("/readyz")).status_code == 503
    proxy.start()
    await wait_for_status(http, kept.bearer(), 200)
    assert (await http.get("/readyz")).status_code == 200
    assert (await http.get("/api/hello", headers=leaving.bearer())).status_code == 401
    assert (await http.get("/api/hello", headers=kept.bearer())).status_code == 200


async def test_a_recorded_logout_redis_missed_is_put_in_force_later(
    client: httpx.AsyncClient, user: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = iter([True])

    async def add_fails_once(self: RedisBlocklist, entries: object, *, seq: int | None) -> None:
        if next(failures, False):
            raise BlocklistUnavailable("connection reset")
        await original(self, entries, seq=seq)  # type: ignore[arg-type]

    original = RedisBlocklist.add
    monkeypatch.setattr(RedisBlocklist, "add", add_fails_once)
    assert (await client.post("/auth/logout", headers=user.bearer())).status_code == 202
    # Recorded in PostgreSQL: the next checks reload the record into Redis.
    await wait_for_status(client, user.bearer(), 401)


async def until_spared(
    client: httpx.AsyncClient, sent: list[bytes], sessions: dict[Session, int]
) -> None:
    """Repeat each session's GET, checking its status, until a round needs no Redis check.

    The first checks subscribe the worker to the feed, and a check while it is not fresh asks
    Redis; once it is subscribed and fresh, kept verdicts answer without a round trip.
    """
    deadline = time.monotonic() + 5
    while True:
        sent.clear()
        for session, status in sessions.items():
            assert (await client.get("/api/hello", headers=session.bearer())).status_code == status
        if not sent:
            return
        assert time.monotonic() < deadline, "kept verdicts never spared a round trip"


async def test_a_kept_verdict_spares_the_round_trip_until_a_revocation(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A window wide enough that a slow machine's pauses between requests do not lapse it.
    own = settings.model_copy(update={"revocation_propagation_ms": 400})
    async with serve_in_process(own) as client:
        staying, leaving = await two_sessions(client)
        sent = count_redis_checks(monkeypatch)
        await until_spared(client, sent, {staying: 200, leaving: 200})
        assert (await client.post("/auth/logout", headers=leaving.bearer())).status_code == 204
        sent.clear()
        # The logout dropped the revoked token's verdict: its next check asks Redis.
        assert (await client.get("/api/hello", headers=leaving.bearer())).status_code == 401
        assert len(sent) == 1
        # Once the worker is fresh again (the logout's wait may have outlasted the window),
        # the other session's verdict, kept from before the logout, still answers alone.
        await until_spared(client, sent, {leaving: 401})
        assert (await client.get("/api/hello", headers=staying.bearer())).status_code == 200
        assert sent == []


def count_redis_checks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every check script call sent to Redis from now on."""
    sent: list[bytes] = []
    send = aredis_connection.AbstractConnection.send_packed_command

    async def counting(self: Any, command: Any, check_health: bool = True) -> None:
        data = b"".join(command) if isinstance(command, list) else command
        if b"EVALSHA" in data:
            sent.append(data)
        await send(self, command, check_health)

    monkeypatch.setattr(aredis_connection.AbstractConnection, "send_packed_command", counting)
    return sent


async def test_verification_during_revocations_never_finds_redis_behind(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from service.loop import WorkerLoop

    # Writes back to back (no propagation wait), so that many land while Redis is read.
    store = Store(settings.model_copy(update={"revocation_propagation_ms": 0}), WorkerLoop())
    now = int(time.time())

    async def revoke_many() -> None:
        for _ in range(300):
            await store.revoke([Entry(Kind.TOKEN, new_id(), now + 60)])

    async def verify_many() -> None:
        for _ in range(200):
            await store.verify()

    try:
        await store.warm_up()
        with caplog.at_level(logging.ERROR, logger="service.store"):
            await asyncio.gather(revoke_many(), revoke_many(), verify_many())
    finally:
        await store.close()
    # A write answered while Redis was being read is no sign that Redis went back.
    assert [
        record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR
    ] == []


async def test_durable_record_holds_every_kind(settings: Settings, tmp_path: Path) -> None:
    from service.loop import WorkerLoop
    from service.store.revocations import stream_active

    store = Store(settings, WorkerLoop())
    now = int(time.time())
    entries = [
        Entry(Kind.TOKEN, "a" * 32, now + 60),
        Entry(Kind.SESSION, "b" * 32, now + 120),
        Entry(Kind.USER, "some-user", now + 180, cutoff_ms=now * 1000),
        Entry(Kind.USER, "some-user", now + 90, cutoff_ms=now * 1000 - 5),
    ]
    await store.revoke(entries)
    async with store.db.session() as session:
        active = {(e.kind, e.subject): e async for e in stream_active(session)}
    assert active[(Kind.TOKEN, "a" * 32)].expires_at == now + 60
    user_entry = active[(Kind.USER, "some-user")]
    assert (user_entry.expires_at, user_entry.cutoff_ms) == (now + 180, now * 1000)
    await store.close()


async def test_a_restored_snapshot_is_reloaded_before_use(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    revoked, kept = await two_sessions(client)
    assert (await client.post("/auth/logout", headers=revoked.bearer())).status_code == 204
    # A restart from an older snapshot (or a failover to a lagging replica): the ready
    # marker survived but names another server process, and the newest entries are gone.
    claims = claims_of(revoked.access)
    r = redis_client(settings)
    r.delete(
        blocklist_of(settings).bucket_key(Kind.SESSION, str(claims["sid"]), int(claims["sxp"]))
    )
    r.set(f"{settings.redis_prefix}ready", "run-id-of-a-previous-process")
    r.close()
    first = await client.get("/api/hello", headers=revoked.bearer())
    assert first.status_code in {401, 503}
    await wait_for_status(client, kept.bearer(), 200)
    assert (await client.get("/api/hello", headers=revoked.bearer())).status_code == 401


async def test_expired_durable_revocations_are_purged(settings: Settings) -> None:
    from service.loop import WorkerLoop
    from service.store.revocations import stream_active

    store = Store(settings, WorkerLoop())
    now = int(time.time())
    await store.revoke(
        [Entry(Kind.TOKEN, "e" * 32, now + 1), Entry(Kind.TOKEN, "f" * 32, now + 600)]
    )
    await asyncio.sleep(1.5)
    assert await store.purge() >= 1
    async with store.db.session() as session:
        left = {e.subject async for e in stream_active(session)}
    assert "f" * 32 in left and "e" * 32 not in left
    await store.close()


async def test_marks_of_unwritten_revocations_add_up_and_only_those_read_are_dropped(
    settings: Settings, postgres_server: str, tmp_path: Path
) -> None:
    from service.store.db import Database
    from service.store.migrate import upgrade
    from service.store.revocations import (
        Unwritten,
        drop_unwritten_marks,
        mark_unwritten,
        unwritten_marks,
    )

    with fresh_database(postgres_server) as url:
        own = settings_beside(settings, tmp_path, database_url=url)
        await asyncio.to_thread(upgrade, own)
        database = Database(own)
        try:
            async with database.session() as session:
                assert await unwritten_marks(session) is None
                for after, groups in ((10, {1}), (5, {2, 3}), (20, {1})):
                    mark_unwritten(session, Unwritten(after, frozenset(groups)))
            async with database.session() as session:
                read = await unwritten_marks(session)
                assert read is not None and read[1] == Unwritten(5, frozenset({1, 2, 3}))
                mark_unwritten(session, Unwritten(30, frozenset({7})))  # after the read
                await drop_unwritten_marks(session, up_to=read[0])
            async with database.session() as session:
                left = await unwritten_marks(session)
            assert left is not None and left[1] == Unwritten(30, frozenset({7}))
        finally:
            await database.dispose()

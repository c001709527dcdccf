"""Failed sign-ins and client authentications meet a 429; password hashing sheds with a 503."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from service.addresses import address_group
from service.config import ConfigError, Settings, load_settings
from service.oauth.clients import Registered, register_client
from service.store import throttle as throttle_store
from service.store.db import Database
from service.store.throttle import Attempt, Counter, MemoryThrottle
from tests.conftest import register, serve_in_process, settings_beside
from tests.proxy import TcpProxy

PASSWORD = "correct horse battery"
WRONG = "not the password"
BASE = "https://testserver"
PROBLEM = "application/problem+json"


def throttled(settings: Settings, tmp: Path, prefix: str, **overrides: Any) -> Settings:
    """Settings on the test backends with a Redis prefix of this test's own."""
    return settings_beside(settings, tmp, **({"redis_prefix": prefix} | overrides))


def from_address(server: serve_in_process, address: str) -> httpx.AsyncClient:
    """A client of the same app whose requests come from address."""
    transport = httpx.ASGITransport(app=server.app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url=BASE)


async def sign_in(http: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    """POST /auth/login."""
    return await http.post("/auth/login", json={"username": username, "password": password})


@pytest.fixture
async def app(settings: Settings, tmp_path: Path, prefix: str) -> AsyncIterator[serve_in_process]:
    """An app whose limits are small: 3 per pair, 5 per account, 8 per address."""
    limits = {
        "login_failures_per_pair": 3,
        "login_failures_per_account": 5,
        "login_failures_per_address": 8,
        "client_failures_per_client": 3,
        "client_failures_per_address": 8,
    }
    server = serve_in_process(throttled(settings, tmp_path, prefix, **limits))
    async with server:
        yield server


async def test_known_and_unknown_users_meet_the_same_429(app: serve_in_process) -> None:
    http = app.http
    known = await register(http, PASSWORD)
    unknown = f"nobody_{uuid.uuid4().hex[:10]}"
    answers: dict[str, list[httpx.Response]] = {known: [], unknown: []}
    for _ in range(4):
        for username in answers:
            answers[username].append(await sign_in(http, username, WRONG))
    for responses in answers.values():
        assert [r.status_code for r in responses] == [401, 401, 401, 429]
    first, second = (responses[-1] for responses in answers.values())
    assert first.json() == second.json()
    assert first.json()["status"] == 429
    for refused in (first, second):
        assert refused.headers["content-type"] == PROBLEM
        assert 0 < int(refused.headers["retry-after"]) <= 900
        assert refused.headers.keys() - {"retry-after"} == second.headers.keys() - {"retry-after"}
    # While refused, the right password is refused too: guessing stops here.
    assert (await sign_in(http, known, PASSWORD)).status_code == 429


async def test_two_workers_share_the_counters(
    settings: Settings, tmp_path: Path, prefix: str
) -> None:
    shared = throttled(settings, tmp_path, prefix, login_failures_per_pair=4)
    async with serve_in_process(shared) as first, serve_in_process(shared) as second:
        username = await register(first, PASSWORD)
        for worker in (first, second, first, second):
            assert (await sign_in(worker, username, WRONG)).status_code == 401
        assert (await sign_in(first, username, PASSWORD)).status_code == 429
        assert (await sign_in(second, username, PASSWORD)).status_code == 429


async def test_retry_after_is_honoured_and_success_clears_the_pair(
    settings: Settings, tmp_path: Path, prefix: str
) -> None:
    brief = throttled(settings, tmp_path, prefix, login_failures_per_pair=2, throttle_window=2)
    async with serve_in_process(brief) as http:
        username = await register(http, PASSWORD)
        for _ in range(2):
            assert (await sign_in(http, username, WRONG)).status_code == 401
        refused = await sign_in(http, username, PASSWORD)
        assert refused.status_code == 429
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= 2
        await asyncio.sleep(retry_after)
        deadline = time.monotonic() + 5
        while (answer := await sign_in(http, username, PASSWORD)).status_code == 429:
            assert time.monotonic() < deadline, "still refused long after Retry-After"
            await asyncio.sleep(0.1)
        assert answer.status_code == 200
        # The success cleared the pair: two more failures are allowed again.
        assert (await sign_in(http, username, WRONG)).status_code == 401
        assert (await sign_in(http, username, WRONG)).status_code == 401
        assert (await sign_in(http, username, WRONG)).status_code == 429


async def test_an_attacker_elsewhere_cannot_lock_the_owner_out(app: serve_in_process) -> None:
    username = await register(app.http, PASSWORD)
    async with from_address(app, "198.51.100.7") as home:
        assert (await sign_in(home, username, PASSWORD)).status_code == 200
    # Five addresses fail once each: the account's limit (5) for new addresses is reached.
    for n in range(5):
        async with from_address(app, f"203.0.113.{n + 1}") as attacker:
            assert (await sign_in(attacker, username, WRONG)).status_code == 401
    async with from_address(app, "192.0.2.44") as elsewhere:
        assert (await sign_in(elsewhere, username, PASSWORD)).status_code == 429
    async with from_address(app, "198.51.100.7") as home:
        assert (await sign_in(home, username, PASSWORD)).status_code == 200


async def test_one_address_spraying_many_accounts_is_stopped(app: serve_in_process) -> None:
    async with from_address(app, "2001:db8:7:7::1") as sprayer:
        for _ in range(8):
            victim = f"victim_{uuid.uuid4().hex[:10]}"
            assert (await sign_in(sprayer, victim, WRONG)).status_code == 401
    # The same /64, another address and account: still the same sprayer.
    async with from_address(app, "2001:db8:7:7:ffff::2") as same_network:
        assert (await sign_in(same_network, "someone_else", WRONG)).status_code == 429
    async with from_address(app, "2001:db8:7:8::1") as neighbour:
        assert (await sign_in(neighbour, "someone_else", WRONG)).status_code == 401


def test_addresses_are_grouped_per_ipv4_address_and_ipv6_64() -> None:
    assert address_group("192.0.2.1") == "192.0.2.1"
    assert address_group("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_group("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert address_group("fe80::1%eth0") == "fe80::/64"
    assert address_group("x" * 500) == "x" * 64


async def test_the_login_page_and_password_change_count_too(app: serve_in_process) -> None:
    http = app.http
    username = await register(http, PASSWORD)
    tokens = (await sign_in(http, username, PASSWORD)).json()
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    change = {"current_password": WRONG, "new_password": "another long password"}
    for _ in range(3):
        assert (await http.post("/auth/password", json=change, headers=bearer)).status_code == 403
    assert (await http.post("/auth/password", json=change, headers=bearer)).status_code == 429
    page = await http.get("/oauth/login")
    csrf = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    form = {"csrf_token": csrf, "username": username, "password": PASSWORD}
    refused = await http.post("/oauth/login", data=form)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) > 0
    assert "Too many failed sign-in attempts" in refused.text


async def test_login_fails_closed_and_client_auth_open_without_redis(
    settings: Settings, tmp_path: Path, prefix: str
) -> None:
    upstream = urlsplit(str(settings.redis_url))
    proxy = TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 6379)
    proxy.start()
    try:
        proxied = throttled(
            settings,
            tmp_path,
            prefix,
            redis_url=f"redis://127.0.0.1:{proxy.port}{upstream.path or '/0'}",
            redis_timeout=0.3,
        )
        async with serve_in_process(proxied) as http:
            username = await register(http, PASSWORD)
            machine = await new_machine(proxied)
            proxy.stop()
            refused = await sign_in(http, username, PASSWORD)
            assert refused.status_code == 503
            assert refused.headers["content-type"] == PROBLEM
            assert int(refused.headers["retry-after"]) > 0
            wrong = await ask_token(http, machine, WRONG)
            assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
            assert (await ask_token(http, machine)).status_code == 200
            proxy.start()
            deadline = time.monotonic() + 10
            while (await sign_in(http, username, PASSWORD)).status_code != 200:
                assert time.monotonic() < deadline, "sign-in never recovered"
                await asyncio.sleep(0.2)
    finally:
        proxy.close()


async def new_machine(settings: Settings) -> Registered:
    """A confidential client_credentials client, registered straight in the database."""
    database = Database(settings)
    try:
        return await register_client(
            database=database,
            name=f"machine-{uuid.uuid4().hex[:6]}",
            grant_types=["client_credentials"],
            scope="profile",
        )
    finally:
        await database.dispose()


def basic(client_id: str, secret: str) -> dict[str, str]:
    """HTTP Basic client credentials."""
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


async def ask_token(
    http: httpx.AsyncClient, registered: Registered, secret: str | None = None
) -> httpx.Response:
    """A client_credentials token request, with the client's secret or another."""
    headers = basic(registered.client.client_id, secret or registered.secret or "")
    return await http.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, headers=headers
    )


async def test_failed_client_authentication_meets_slow_down(
    app: serve_in_process, settings: Settings
) -> None:
    http = app.http
    machine = await new_machine(settings)
    for _ in range(3):
        wrong = await ask_token(http, machine, WRONG)
        assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
    slowed = await ask_token(http, machine, WRONG)
    assert slowed.status_code == 429
    assert slowed.json()["error"] == "slow_down"
    assert slowed.headers["content-type"].startswith("application/json")
    assert slowed.headers["cache-control"] == "no-store"
    assert 0 < int(slowed.headers["retry-after"]) <= 900
    # A secret nobody can guess is never refused, so nobody can lock the client out.
    assert (await ask_token(http, machine)).status_code == 200
    introspect = await http.post(
        "/oauth/introspect",
        data={"token": "whatever"},
        headers=basic(machine.client.client_id, WRONG),
    )
    assert introspect.status_code == 429
    assert introspect.json()["error"] == "slow_down"


async def test_an_unknown_client_id_is_counted_alike(app: serve_in_process) -> None:
    answers = [
        await app.http.post(
            "/oauth/introspect", data={"token": "x"}, headers=basic("no-such-client", WRONG)
        )
        for _ in range(4)
    ]
    assert [r.status_code for r in answers] == [401, 401, 401, 429]
    assert answers[-1].json()["error"] == "slow_down"


@pytest.mark.fault
async def test_a_login_flood_is_shed_while_refresh_stays_fast(
    settings: Settings, tmp_path: Path, prefix: str
) -> None:
    flood_size, limit = 300, 64
    owasp = throttled(
        settings,
        tmp_path,
        prefix,
        password_memory_kib=19456,
        password_time_cost=2,
        password_queue_limit=limit,
    )
    async with serve_in_process(owasp) as http:
        username = await register(http, PASSWORD)
        refresh_token = (await sign_in(http, username, PASSWORD)).json()["refresh_token"]

        async def timed_login() -> tuple[int, float, httpx.Response]:
            started = time.monotonic()
            response = await sign_in(http, username, PASSWORD)
            return response.status_code, time.monotonic() - started, response

        logins = [asyncio.create_task(timed_login()) for _ in range(flood_size)]
        deadline = time.monotonic() + 20
        while not any(t.done() and t.result()[0] == 503 for t in logins):
            assert time.monotonic() < deadline, "no login was shed"
            await asyncio.sleep(0.01)
        started = time.monotonic()
        refreshed = await http.post(
            "/auth/refresh", headers={"Authorization": f"Bearer {refresh_token}"}
        )
        refresh_seconds = time.monotonic() - started
        still_hashing = sum(not t.done() for t in logins)
        results = await asyncio.gather(*logins)
    assert refreshed.status_code == 200
    assert refresh_seconds < 2.0, refresh_seconds
    assert still_hashing > 0, "the refresh did not run during the flood"
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}
    shed = [(seconds, response) for status, seconds, response in results if status == 503]
    # At most `limit` wait or run at once (one worker here): a few more got in as the
    # first ones finished, the rest were shed.
    assert len(shed) > flood_size - 2 * limit
    for _, response in shed:
        assert response.headers["content-type"] == PROBLEM
        assert int(response.headers["retry-after"]) > 0
    # Shed at once, not after waiting their turn behind the admitted ones.
    slowest_admitted = max(seconds for status, seconds, _ in results if status == 200)
    assert max(seconds for seconds, _ in shed) < slowest_admitted


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The in-memory counters' clock, moved by the test."""
    now = [1000.0]
    monkeypatch.setattr(throttle_store, "now", lambda: now[0])
    yield now


def attempt_of(subject: str, *, limit: int = 2, window: int = 60) -> Attempt:
    """One pair counter cleared by success, and a known-pair marker."""
    counter = Counter("pair", (subject,), limit, cleared_by_success=True)
    return Attempt(kind="t", counters=(counter,), window=window, known=(subject,), known_ttl=600)


async def test_memory_counters_expire_with_their_window(clock: list[float]) -> None:
    counters = MemoryThrottle("secret")
    attempt = attempt_of("alice")
    assert await counters.fail(attempt) == 0
    assert await counters.fail(attempt) == 0
    assert await counters.check(attempt) == 60
    assert await counters.succeed(attempt) == 60  # refused: the pair is past its limit
    assert await counters.fail(attempt) == 60  # a failure past the limit says so
    clock[0] += 59.5
    assert await counters.check(attempt) == 0.5
    clock[0] += 0.5
    assert await counters.check(attempt) == 0
    assert await counters.succeed(attempt) == 0


async def test_memory_counters_stay_bounded(clock: list[float]) -> None:
    counters = MemoryThrottle("secret", max_entries=10)
    for n in range(100):
        await counters.fail(attempt_of(f"user{n}"))
    assert counters.kept == 10


def test_the_pair_limit_is_the_strict_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="LOGIN_FAILURES_PER_PAIR"):
        load_settings(
            service_env="development",
            instance_dir=tmp_path,
            login_failures_per_pair=10,
            login_failures_per_account=5,
        )

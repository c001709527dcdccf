"""A hung PostgreSQL: every call ends in 503 within its bound, and the rest keeps serving."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from service.config import Settings
from service.store.db import Database, unavailable_reason
from tests.conftest import Session, login, register, serve_in_process, settings_beside
from tests.oauth_helpers import (
    REDIRECT,
    authorization_code,
    bearer,
    new_client,
)
from tests.proxy import TcpProxy
from tests.servers import ROOT

pytestmark = pytest.mark.fault

# Each bound is one second here; the service defaults are a few seconds.
BOUNDS = {
    "database_connect_timeout": 1.0,
    "database_statement_timeout": 1.0,
    "database_pool_timeout": 1.0,
}
# What a request may take while PostgreSQL hangs: its bounds, with room for a loaded machine.
WITHIN_BOUND = 6.0
# What a request that needs no database may take meanwhile.
PROMPTLY = 1.5
# How long a test waits for something that should not come (before the change: a hang).
GIVE_UP = 20.0
PASSWORD = "correct horse battery"
CLIENT_CREDENTIALS = {"grant_type": "client_credentials"}


def through(proxy: TcpProxy, url: str) -> str:
    """The database URL with the proxy in front of the server."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def proxied_settings(settings: Settings, proxy: TcpProxy, tmp: Path, **extra: Any) -> Settings:
    """The shared test settings, with PostgreSQL behind the proxy and tight bounds."""
    return settings_beside(
        settings, tmp, database_url=through(proxy, str(settings.database_url)), **(BOUNDS | extra)
    )


@pytest.fixture
def proxy(settings: Settings) -> Iterator[TcpProxy]:
    """A proxy in front of the test PostgreSQL, thawed and closed afterwards."""
    upstream = urlsplit(str(settings.database_url))
    tcp = TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 5432)
    tcp.start()
    yield tcp
    tcp.thaw()
    tcp.close()


@pytest.fixture
async def app(
    settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """The app as Hypercorn serves it, its PostgreSQL behind the proxy."""
    async with serve_in_process(proxied_settings(settings, proxy, tmp_path)) as http:
        try:
            yield http
        finally:
            proxy.thaw()  # shutting down closes the pooled connections


async def timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    """The response and how long it took; fails the test past GIVE_UP."""
    started = time.monotonic()
    response = await asyncio.wait_for(request, GIVE_UP)
    return response, time.monotonic() - started


def assert_unavailable(response: httpx.Response, elapsed: float) -> None:
    """A 503 problem with Retry-After, within the bound."""
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["status"] == 503
    assert "Traceback" not in response.text
    assert elapsed < WITHIN_BOUND, f"answered after {elapsed:.1f}s"


async def status(response: Awaitable[httpx.Response], expected: int = 200) -> httpx.Response:
    """The response, which must have the expected status."""
    answer = await response
    assert answer.status_code == expected, answer.text
    return answer


async def oauth_access_token(http: httpx.AsyncClient, settings: Settings, user: Session) -> str:
    """An OAuth access token with scope profile, through the code flow."""
    registered = await new_client(settings)
    code, verifier = await authorization_code(
        http, registered.client.client_id, user.username, PASSWORD
    )
    response = await http.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        },
        auth=(registered.client.client_id, registered.secret or ""),
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


async def test_login_refresh_and_logout_answer_503_in_time_then_recover(
    app: httpx.AsyncClient, proxy: TcpProxy, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    http = app
    user = await login(http, await register(http, PASSWORD), PASSWORD)
    machine = await new_client(settings, grant_types=["client_credentials"], redirect_uris=[])
    machine_auth = (machine.client.client_id, machine.secret or "")
    proxy.freeze()
    caplog.set_level(logging.INFO)
    answers = await asyncio.gather(
        timed(http.post("/auth/login", json={"username": user.username, "password": PASSWORD})),
        timed(http.post("/auth/refresh", headers=user.bearer(user.refresh))),
        timed(http.post("/auth/logout", headers=user.bearer())),
        # Its client is read ahead over the raw connections first, then by the view.
        timed(http.post("/oauth/token", data=CLIENT_CREDENTIALS, auth=machine_auth)),
    )
    for response, elapsed in answers:
        assert_unavailable(response, elapsed)
    # One line per failed request, naming the kind of failure only.
    said = [r for r in caplog.records if r.getMessage().startswith("storage unavailable")]
    assert len(said) == len(answers), caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    for secret in (PASSWORD, user.access, user.refresh, machine_auth[1]):
        assert secret not in caplog.text

    proxy.thaw()
    # Nothing failed halfway: the refresh token was not spent, the session not revoked.
    # At once: no connection the freeze left behind is used again.
    await status(http.post("/auth/login", json={"username": user.username, "password": PASSWORD}))
    refreshed = await status(http.post("/auth/refresh", headers=user.bearer(user.refresh)))
    access = refreshed.json()["access_token"]
    assert (await http.get("/auth/me", headers=bearer(access))).status_code == 200
    assert (await http.post("/auth/logout", headers=bearer(access))).status_code == 204
    token = await http.post("/oauth/token", data=CLIENT_CREDENTIALS, auth=machine_auth)
    assert token.status_code == 200, token.text


async def test_requests_without_the_database_are_served_while_it_hangs(
    app: httpx.AsyncClient, proxy: TcpProxy, settings: Settings
) -> None:
    http = app
    user = await login(http, await register(http, PASSWORD), PASSWORD)
    oauth_token = await oauth_access_token(http, settings, user)
    proxy.freeze()
    credentials = {"username": user.username, "password": PASSWORD}
    # More than four times the database turns (DATABASE_POOL_SIZE), all bound for the hung database.
    stuck = [
        asyncio.ensure_future(timed(http.post("/auth/login", json=credentials))) for _ in range(48)
    ]
    probes = 0
    while probes < 3 or not all(task.done() for task in stuck):
        waiting = sum(not task.done() for task in stuck)
        for path, headers in (("/api/profile", bearer(oauth_token)), ("/api/hello", user.bearer())):
            response, elapsed = await timed(http.get(path, headers=headers))
            assert response.status_code == 200, (path, response.text)
            assert elapsed < PROMPTLY, f"{path} took {elapsed:.1f}s with {waiting} requests stuck"
        probes += 1
        if waiting:
            await asyncio.wait(stuck, timeout=0.05)
    for response, elapsed in await asyncio.gather(*stuck):
        assert_unavailable(response, elapsed)

    proxy.thaw()
    await status(http.post("/auth/login", json=credentials))
    await status(http.get("/auth/me", headers=user.bearer()))


async def test_waiting_for_a_pooled_connection_is_bounded(
    settings: Settings, proxy: TcpProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Two connections at most, both held by requests stuck on the hung database; more
    # turns than connections, so that the third waits for the pool, not for a turn.
    tight = {"database_pool_size": 1, "database_pool_timeout": 0.3, "database_max_requests": 3}
    bounds = {"database_connect_timeout": 3.0, "database_statement_timeout": 3.0}
    proxied = proxied_settings(settings, proxy, tmp_path, **tight, **bounds)
    async with serve_in_process(proxied) as http:
        user = await login(http, await register(http, PASSWORD), PASSWORD)
        proxy.freeze()
        caplog.set_level(logging.WARNING)
        try:
            answers = await asyncio.gather(
                *(timed(http.get("/auth/me", headers=user.bearer())) for _ in range(3))
            )
        finally:
            proxy.thaw()
    for response, elapsed in answers:
        assert_unavailable(response, elapsed)
    assert "no pooled connection free in time" in caplog.text
    assert min(elapsed for _, elapsed in answers) < 2.0  # it did not wait for the others


async def test_a_database_frozen_at_connect_gives_503_in_time(
    settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    proxy.freeze()  # before the app's first connection: accepted, start-up never answered
    started = time.monotonic()
    server = serve_in_process(proxied_settings(settings, proxy, tmp_path))
    http = await asyncio.wait_for(server.__aenter__(), GIVE_UP)
    try:
        assert time.monotonic() - started < 2 * WITHIN_BOUND, "start-up waited out the freeze"
        username = f"frozen_{int(time.time() * 1000)}"
        response, elapsed = await timed(
            http.post("/auth/register", json={"username": username, "password": PASSWORD})
        )
        assert_unavailable(response, elapsed)
        proxy.thaw()
        await status(
            http.post("/auth/register", json={"username": username, "password": PASSWORD}), 201
        )
        await login(http, username, PASSWORD)
    finally:
        proxy.thaw()
        await server.__aexit__(None, None, None)


async def test_ping_is_bounded_and_a_timed_out_connection_is_dropped(
    settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    database = Database(proxied_settings(settings, proxy, tmp_path))
    try:
        async with database.engine.connect() as connection:
            pooled = (await connection.get_raw_connection()).driver_connection
        proxy.freeze()
        for _ in range(2):  # the statement on the pooled connection, then a new connection
            started = time.monotonic()
            with pytest.raises(Exception) as failed:
                await asyncio.wait_for(database.ping(), GIVE_UP)
            assert time.monotonic() - started < WITHIN_BOUND
            assert unavailable_reason(failed.value) is not None, failed.value
        assert pooled is not None and pooled.is_closed()
        proxy.thaw()
        await database.ping()
        async with database.engine.connect() as connection:
            assert (await connection.get_raw_connection()).driver_connection is not pooled
    finally:
        proxy.thaw()
        await database.dispose()


def test_the_command_line_says_so_in_one_line(
    settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    proxy.freeze()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "SERVICE_ENV": "production",
        "DATABASE_URL": through(proxy, str(settings.database_url)),
        "REDIS_URL": str(settings.redis_url),
        "SECRET_KEY": str(settings.secret_key),
        "JWT_SECRET": str(settings.jwt_secret),
        "JWT_ISSUER": "https://127.0.0.1:8443",
        "DATABASE_CONNECT_TIMEOUT": "1",
        "DATABASE_STATEMENT_TIMEOUT": "1",
    }
    for command in (["migrate"], ["clients", "list"]):
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "service", *command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=GIVE_UP,
            check=False,
        )
        assert time.monotonic() - started < 2 * WITHIN_BOUND
        assert done.returncode == 1, done.stderr
        # Whatever was logged before, one line says why, and no traceback.
        errors = [
            line
            for line in done.stderr.splitlines()
            if " INFO " not in line and '"level": "INFO"' not in line
        ]
        assert errors == [done.stderr.strip().splitlines()[-1]], done.stderr
        assert errors[0].startswith("database unavailable: "), done.stderr
        assert "timed out" in errors[0] or "no answer in time" in errors[0], done.stderr

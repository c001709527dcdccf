"""Password hashing sheds with a 503 past a bounded queue; other requests stay fast."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service import create_app
from service.auth.passwords import hashing_lane
from service.config import Settings
from tests.conftest import make_settings, register, serve_in_process

PASSWORD = "correct horse battery"
PROBLEM = "application/problem+json"


def throttled(settings: Settings, tmp: Path, prefix: str, **overrides: Any) -> Settings:
    """Settings on the test backends with a Redis prefix of this test's own."""
    values: dict[str, Any] = {
        "database_url": settings.database_url,
        "redis_url": settings.redis_url,
        "redis_prefix": prefix,
        "secret_key": settings.secret_key,  # the stored OAuth signing keys are sealed with it
        "jwt_secret": settings.jwt_secret,
        **overrides,
    }
    return make_settings(tmp, **values)


async def sign_in(http: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    """POST /auth/login."""
    return await http.post("/auth/login", json={"username": username, "password": password})


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


def test_the_hashing_lane_takes_the_posts_that_hash(settings: Settings) -> None:
    app = create_app(settings)
    lane = hashing_lane(app, settings)
    hashing = [("POST", path) for path in ("/auth/login", "/auth/register", "/auth/password")]
    for method, path in [*hashing, ("POST", "/oauth/login")]:
        assert lane.selects(method, path), path
    for method, path in [("GET", "/oauth/login"), ("POST", "/auth/refresh"), ("GET", "/")]:
        assert not lane.selects(method, path), path

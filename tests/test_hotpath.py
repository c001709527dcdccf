"""The inline policy: only marked views run on the event loop, and stay cheap without Redis."""

from __future__ import annotations

import time

import httpx
import pytest

from service import create_app
from service.config import Settings
from service.hotpath import inline_policy
from tests.conftest import login, register
from tests.proxy import TcpProxy


@pytest.mark.parametrize(
    ("method", "path", "inline"),
    [
        ("GET", "/api/hello", True),
        ("GET", "/healthz", True),
        ("HEAD", "/healthz", True),
        ("POST", "/auth/login", False),
        ("POST", "/auth/logout", False),
        ("GET", "/readyz", False),
        ("GET", "/no/such/path", False),
        ("POST", "/api/hello", False),
    ],
)
def test_only_marked_views_run_inline(
    settings: Settings, method: str, path: str, inline: bool
) -> None:
    assert inline_policy(create_app(settings))(method, path) is inline


async def test_breaker_answers_fast_while_redis_is_down(
    cut_redis: tuple[httpx.AsyncClient, TcpProxy],
) -> None:
    http, proxy = cut_redis
    password = "correct horse battery"
    session = await login(http, await register(http, password), password)
    proxy.stop()
    assert (await http.get("/api/hello", headers=session.bearer())).status_code == 503
    started = time.perf_counter()
    for _ in range(20):
        assert (await http.get("/api/hello", headers=session.bearer())).status_code == 503
    # Twenty checks inside the breaker window cost no network timeout each.
    assert time.perf_counter() - started < 0.3 * 5

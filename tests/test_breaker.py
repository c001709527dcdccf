"""While Redis is down, token checks meet the blocklist's breaker: a prompt 503, no timeout each."""

from __future__ import annotations

import time

import httpx

from tests.conftest import login, register
from tests.proxy import TcpProxy


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

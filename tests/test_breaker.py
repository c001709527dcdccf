"""While Redis is down, token checks meet the blocklist's breaker: a prompt 503, no timeout each."""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client import REGISTRY

from tests.conftest import Session, login, register
from tests.proxy import TcpProxy


async def test_breaker_answers_fast_while_redis_is_down(
    cut_redis: tuple[httpx.AsyncClient, TcpProxy],
) -> None:
    http, proxy = cut_redis
    session = await signed_in(http)
    proxy.stop()
    assert (await http.get("/api/hello", headers=session.bearer())).status_code == 503
    started = time.perf_counter()
    for _ in range(20):
        assert (await http.get("/api/hello", headers=session.bearer())).status_code == 503
    # Twenty checks inside the breaker window cost no network timeout each.
    assert time.perf_counter() - started < 0.3 * 5


async def signed_in(http: httpx.AsyncClient) -> Session:
    """A new user's first session."""
    password = "correct horse battery"
    return await login(http, await register(http, password), password)


def doubting_workers() -> float | None:
    """The gauge of workers that doubt Redis, as this process's registry holds it."""
    return REGISTRY.get_sample_value("authsvc_workers_doubting_redis")


async def test_a_worker_that_doubts_redis_says_so_until_it_recovered(
    cut_redis: tuple[httpx.AsyncClient, TcpProxy],
) -> None:
    http, proxy = cut_redis
    session = await signed_in(http)
    assert (await http.get("/api/hello", headers=session.bearer())).status_code == 200
    proxy.stop()
    assert (await http.get("/api/hello", headers=session.bearer())).status_code == 503
    assert doubting_workers() == 1
    proxy.start()
    deadline = time.monotonic() + 10
    while (await http.get("/api/hello", headers=session.bearer())).status_code != 200:
        assert time.monotonic() < deadline, "the worker never recovered"
        await asyncio.sleep(0.05)
    assert doubting_workers() == 0

"""Distinct large HTTP/2 headers and paths leave a worker's memory within a bound."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service import create_app
from service.adapter import PATH_CACHE_LONGEST, unquote_path, unquote_short_path
from service.config import Settings
from service.isolation import ROUTE_CACHE_LONGEST, marked_views
from tests.h2_raw import RawH2
from tests.servers import RunningServer, server_env, start_server

REQUESTS = 2000
WARM_UP = 300
CONNECTIONS = 4
STREAMS = 8  # concurrent requests per connection
GROWTH_BOUND = 64 * 1024 * 1024  # bytes a worker may grow by over the flood


@pytest.fixture
def server(settings: Settings, tmp_path: Path) -> Iterator[RunningServer]:
    """The service with one worker, stopped afterwards."""
    running = start_server(server_env(settings, tmp_path), workers=1, log_dir=tmp_path)
    try:
        yield running
    finally:
        running.stop()


def worker_pid(server: RunningServer) -> int:
    """The pid of the worker that answers (there is one)."""
    response = httpx.get(server.url + "/healthz", verify=False, timeout=5)
    return int(response.json()["worker"])


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def distinct_request(rng: random.Random, port: int) -> list[tuple[bytes, bytes]]:
    """A GET no one sent before: a 2-4 KiB path, a 8-48 KiB value and a 1 KiB Huffman one."""
    path = b"/flood/" + rng.randbytes(rng.randint(1024, 2048)).hex().encode()
    return [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"127.0.0.1:%d" % port),
        (b":path", path),
        (b"x-pad", rng.randbytes(rng.randint(8192, 24576)).hex().encode()),
        (b"x-tag", rng.randbytes(512).hex().encode()),
    ]


async def flood(server: RunningServer, count: int, rng: random.Random) -> dict[str, int]:
    """Send count distinct requests over a few connections; how many ended with what."""
    port = int(server.url.rsplit(":", 1)[1])
    left = iter(range(count))
    outcomes: dict[str, int] = {}

    async def stream(connection: RawH2) -> None:
        for _ in left:
            outcome = await connection.request(distinct_request(rng, port))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    connections = [await RawH2.open(server.url) for _ in range(CONNECTIONS)]
    try:
        await asyncio.gather(*(stream(c) for c in connections for _ in range(STREAMS)))
    finally:
        for connection in connections:
            await connection.close()
    return outcomes


@pytest.mark.fault
async def test_distinct_large_headers_leave_a_worker_within_its_bound(
    server: RunningServer,
) -> None:
    pid = worker_pid(server)
    rng = random.Random(os.getpid())
    assert await flood(server, WARM_UP, rng) == {"404": WARM_UP}
    before = rss(pid)
    started = time.monotonic()
    outcomes = await flood(server, REQUESTS, rng)
    grown = rss(pid) - before
    assert outcomes == {"404": REQUESTS}, outcomes
    assert grown < GROWTH_BOUND, (
        f"worker grew by {grown / 2**20:.0f} MiB over {REQUESTS} requests "
        f"({time.monotonic() - started:.1f} s)"
    )


def test_only_short_paths_are_remembered_by_the_adapter() -> None:
    before = unquote_short_path.cache_info().currsize
    assert unquote_path("/a%20b/" + "x" * PATH_CACHE_LONGEST) == "/a b/" + "x" * PATH_CACHE_LONGEST
    assert unquote_short_path.cache_info().currsize == before
    assert unquote_path(f"/short/{before}%2F") == f"/short/{before}/"
    assert unquote_short_path.cache_info().currsize == before + 1


def test_only_short_paths_are_remembered_by_the_route_policy(settings: Settings) -> None:
    spared = marked_views(create_app(settings), "no_database")
    assert not spared("GET", "/api/" + "x" * ROUTE_CACHE_LONGEST)
    assert spared("GET", "/api/hello")
    cells = [cell.cell_contents for cell in spared.__closure__ or ()]
    (memo,) = [cell for cell in cells if hasattr(cell, "cache_info")]
    assert memo.cache_info().currsize == 1

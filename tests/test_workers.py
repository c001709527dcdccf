"""Worker processes with a listening socket each: new connections reach every worker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from tests.servers import RunningServer, server_env, start_server

WORKERS = 2
CONNECTIONS = 16


@pytest.fixture
def server(settings: Settings, tmp_path: Path) -> Iterator[RunningServer]:
    """Two Hypercorn workers over TLS, both listening; stopped afterwards if still running."""
    running = start_server(server_env(settings, tmp_path), workers=WORKERS, log_dir=tmp_path)
    try:
        wait_until_listening(running, WORKERS)
        yield running
    finally:
        running.stop()


def wait_until_listening(server: RunningServer, workers: int, timeout: float = 30.0) -> None:
    """Wait for every worker's socket to listen: start_server returns once the first does."""
    deadline = time.monotonic() + timeout
    while server.log().count("Running on https://") < workers:
        assert server.process.poll() is None, server.log()
        assert time.monotonic() < deadline, f"not {workers} workers listening:\n{server.log()}"
        time.sleep(0.05)


async def worker_of_new_connection(server: RunningServer) -> int:
    """Open one HTTP/2 connection and return the pid of the worker that serves it."""
    async with httpx.AsyncClient(
        base_url=server.url, verify=False, http2=True, http1=False
    ) as http:
        responses = [await http.get("/healthz") for _ in range(2)]
    assert {response.http_version for response in responses} == {"HTTP/2"}
    pids = {int(response.json()["worker"]) for response in responses}
    assert len(pids) == 1, f"one connection answered by several workers: {pids}"
    return pids.pop()


async def workers_of_simultaneous_connections(server: RunningServer) -> dict[int, int]:
    """Open CONNECTIONS connections at once; how many each worker pid served."""
    pids = await asyncio.gather(*(worker_of_new_connection(server) for _ in range(CONNECTIONS)))
    return {pid: pids.count(pid) for pid in set(pids)}


def is_running(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_simultaneous_http2_connections_reach_both_workers(server: RunningServer) -> None:
    counts = await workers_of_simultaneous_connections(server)
    assert len(counts) == WORKERS, f"{CONNECTIONS} connections served by {counts}"
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


async def test_a_dead_worker_stops_the_others_and_the_server(server: RunningServer) -> None:
    counts = await workers_of_simultaneous_connections(server)
    assert len(counts) == WORKERS, f"{CONNECTIONS} connections served by {counts}"
    killed, survivor = counts
    os.kill(killed, signal.SIGKILL)
    assert await asyncio.to_thread(server.process.wait, 15) == 1, server.log()
    assert "worker exited" in server.log()
    assert not is_running(survivor), "a worker outlived the server"

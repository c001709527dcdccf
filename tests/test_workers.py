"""Workers with a listening socket each: spread, replaced when one dies, never in a loop."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from tests.servers import (
    RunningServer,
    is_running,
    server_env,
    start_server,
    wait_until_gone,
    wait_until_listening,
)

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


def worker_of(http: httpx.Client) -> int:
    """The pid of the worker that answers on this client's connection."""
    response = http.get("/healthz")
    assert response.status_code == 200, response.text
    return int(response.json()["worker"])


def new_connection(server: RunningServer) -> httpx.Client:
    """A client whose first request opens a new connection (so any worker may take it)."""
    return httpx.Client(base_url=server.url, verify=False, http2=True, http1=False)


async def test_simultaneous_http2_connections_reach_both_workers(server: RunningServer) -> None:
    counts = await workers_of_simultaneous_connections(server)
    assert len(counts) == WORKERS, f"{CONNECTIONS} connections served by {counts}"
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


@pytest.mark.fault
def test_a_killed_worker_is_replaced_while_the_other_serves(server: RunningServer) -> None:
    with new_connection(server) as kept:
        survivor = worker_of(kept)
        victim = next(pid for pid in _all_worker_pids(server) if pid != survivor)
        os.kill(victim, signal.SIGKILL)
        wait_until_gone(victim)
        replacement = _serve_until_a_new_worker_answers(server, kept, {survivor, victim})
        assert worker_of(kept) == survivor
    assert is_running(survivor) and is_running(replacement)
    assert re.search(rf"worker {victim} killed by SIGKILL\b", server.log()), server.log()
    # A requested stop (here SIGTERM to the whole group, workers included) starts no one.
    assert server.stop() == 0, server.log()
    assert server.log().count("Running on https://") == WORKERS + 1, server.log()
    assert len(re.findall(r"worker \d+ (killed by|exited)", server.log())) == 1, server.log()
    assert "Traceback" not in server.log(), server.log()


@pytest.mark.fault
def test_a_worker_that_keeps_dying_at_start_stops_the_service(server: RunningServer) -> None:
    pids = _all_worker_pids(server)
    # New workers load the certificate when they start: now each of them fails at once.
    Path(server.env["TLS_CERT_FILE"]).write_text("not a certificate\n")
    victim, survivor = sorted(pids)
    os.kill(victim, signal.SIGKILL)
    try:
        status = server.process.wait(90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the service did not give up:\n{server.log()}")
    log = server.log()
    assert status == 1, log
    assert re.search(r"worker \d+ exited with status 1.*stopping the service", log), log
    assert len(re.findall(r"worker \d+ (killed by|exited)", log)) >= 3, log
    assert not is_running(survivor), "a worker outlived the service"


def _all_worker_pids(server: RunningServer) -> set[int]:
    """Open connections until every worker has answered one; their pids."""
    pids: set[int] = set()
    deadline = time.monotonic() + 20
    while len(pids) < WORKERS:
        assert time.monotonic() < deadline, f"only workers {pids} answered"
        with new_connection(server) as http:
            pids.add(worker_of(http))
    return pids


def _worker_of_new_connection_retried_once(server: RunningServer) -> int:
    """The worker of a new connection; a reset one is tried again once, on another.

    In whole-suite runs one TLS handshake in a few replacements was reset right after the
    kill (connections queued on the dead worker's socket go with it; why a connection made
    after the death met one is not pinned down). A second reset in a row fails the test.
    """
    for attempt in range(2):
        with new_connection(server) as http:
            try:
                return worker_of(http)
            except httpx.ConnectError as exc:
                if attempt:
                    pytest.fail(f"new connections failed ({exc!r}):\n{server.log()}")
    raise AssertionError("unreachable")


def _serve_until_a_new_worker_answers(
    server: RunningServer, kept: httpx.Client, known: set[int]
) -> int:
    """Every request on kept and on new connections succeeds until an unknown pid answers."""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.log()
        worker_of(kept)
        pid = _worker_of_new_connection_retried_once(server)
        if pid not in known:
            return pid
        time.sleep(0.05)
    pytest.fail(f"no replacement worker answered:\n{server.log()}")

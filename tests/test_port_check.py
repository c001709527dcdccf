"""A second server on an address another process listens on refuses to start, in one line."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from tests.servers import (
    RunningServer,
    free_port,
    launch_server,
    server_env,
    start_server,
    wait_until_listening,
)


@pytest.mark.fault
@pytest.mark.parametrize(
    ("host", "first_workers"), [("127.0.0.1", 2), ("[::1]", 1)], ids=["ipv4", "ipv6"]
)
def test_a_second_server_on_a_taken_address_refuses_to_start(
    settings: Settings, tmp_path: Path, host: str, first_workers: int
) -> None:
    env = server_env(settings, tmp_path)
    bind = f"{host}:{free_port()}"
    first = start_server(env, workers=first_workers, log_dir=tmp_path, bind=bind)
    try:
        wait_until_listening(first, first_workers)
        pids = _worker_pids(first, first_workers)
        for workers in (2, 1):
            second = launch_server(env, bind=bind, workers=workers, log_dir=tmp_path)
            status, log = _outcome(second)
            assert status not in (0, None), f"{workers} worker(s) started:\n{log}"
            line = f"cannot listen on {bind}: another process is listening there"
            assert line in log, log
            assert "Traceback" not in log, log
        assert _worker_pids(first, first_workers) == pids, "the first server lost traffic"
    finally:
        first.stop()


def _outcome(server: RunningServer, timeout: float = 60.0) -> tuple[int | None, str]:
    """Its exit status once it exits, or None as soon as it listens (or never decides)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return server.process.returncode, server.log()
        if "Running on" in server.log():
            break
        time.sleep(0.05)
    log = server.log()
    server.stop()
    return None, log


def _worker_pids(server: RunningServer, workers: int, connections: int = 40) -> set[int]:
    """The pids answering on many new connections: exactly the server's own workers."""
    pids = set()
    for _ in range(connections):
        with httpx.Client(base_url=server.url, verify=False, http2=True) as http:
            response = http.get("/healthz")
            assert response.status_code == 200
            pids.add(int(response.json()["worker"]))
    assert len(pids) == workers, pids
    return pids

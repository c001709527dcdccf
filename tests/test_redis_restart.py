"""A Redis of our own, killed and restarted from its snapshot: revocations must not come back."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.config import Settings
from tests.conftest import make_settings, serve_in_process, two_sessions
from tests.servers import free_port


class SnapshottingRedis:
    """redis-server with RDB snapshots on, on a free port, restartable from its snapshot."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (again) on the same port and data directory."""
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "3600 1",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()

    def crash(self) -> None:
        """SIGKILL: whatever was written after the last snapshot is lost."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """Stop for good."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def snapshotting_redis(tmp_path: Path) -> Iterator[SnapshottingRedis]:
    """A private Redis; needs the redis-server binary (always there in CI)."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: apt-get install redis-server")
        pytest.skip("redis-server is not installed")
    server = SnapshottingRedis(tmp_path)
    server.start()
    yield server
    server.stop()


async def test_revocations_survive_a_crash_restored_from_an_old_snapshot(
    settings: Settings, snapshotting_redis: SnapshottingRedis, tmp_path: Path
) -> None:
    own = make_settings(
        tmp_path,
        database_url=settings.database_url,
        redis_url=snapshotting_redis.url,
        redis_prefix="restart:",
    )
    async with serve_in_process(own) as http:
        revoked, kept = await two_sessions(http)
        redis.Redis.from_url(snapshotting_redis.url).save()  # the last periodic snapshot
        assert (await http.post("/auth/logout", headers=revoked.bearer())).status_code == 204
        snapshotting_redis.crash()
        snapshotting_redis.start()
        deadline = time.monotonic() + 15
        while True:
            revoked_status = (await http.get("/api/hello", headers=revoked.bearer())).status_code
            assert revoked_status in {401, 503}, "a revoked token was accepted after the restart"
            if (await http.get("/api/hello", headers=kept.bearer())).status_code == 200:
                break
            assert time.monotonic() < deadline, "the blocklist was not reloaded"
            await asyncio.sleep(0.1)
        assert (await http.get("/api/hello", headers=revoked.bearer())).status_code == 401

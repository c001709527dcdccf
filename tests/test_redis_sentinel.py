"""Redis behind Sentinel: a failover to a replica never lets a revoked token in."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from service.config import Settings
from tests.conftest import login, register, serve_in_process, settings_beside
from tests.servers import SentinelGroup

pytestmark = pytest.mark.fault

PASSWORD = "correct horse battery"
PREFIX = "sentinel:"


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    """One primary, one replica and three sentinels of this test's own."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: apt-get install redis-server")
        pytest.skip("redis-server is not installed")
    group = SentinelGroup(tmp_path)
    try:
        group.start()
        yield group
    finally:
        group.stop()


def forget_last_write(port: int, seq_before: int) -> None:
    """Make the replica on port look as if the primary's last write never reached it.

    Replication is asynchronous: a primary that dies may take its last writes with it.
    The replica is made writable for a moment, loses every revoked-token hash and goes
    back to the number it held before the write.
    """
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        client.config_set("replica-read-only", "no")
        for key in client.scan_iter(f"{PREFIX}r:*"):
            client.delete(key)
        for key in client.scan_iter(f"{PREFIX}s:*"):
            client.delete(key)
        client.set(f"{PREFIX}seq", seq_before)
        client.config_set("replica-read-only", "yes")
    finally:
        client.close()


def seq_on(port: int) -> int:
    """The blocklist's seq as the server on port holds it."""
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        return int(client.get(f"{PREFIX}seq") or 0)
    finally:
        client.close()


async def status(http: httpx.AsyncClient, token: str) -> int:
    """The protected resource's answer to this access token."""
    response = await http.get("/api/hello", headers={"Authorization": f"Bearer {token}"})
    return response.status_code


async def test_a_failover_keeps_revoked_tokens_out_and_recovers_by_itself(
    settings: Settings,
    sentinels: SentinelGroup,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    own = settings_beside(settings, tmp_path, redis_url=sentinels.url, redis_prefix=PREFIX)
    async with serve_in_process(own) as http:
        username = await register(http, PASSWORD)
        sessions = [await login(http, username, PASSWORD) for _ in range(3)]
        early, late, kept = sessions
        assert (await http.post("/auth/logout", headers=early.bearer())).status_code == 204
        before = seq_on(sentinels.replica_port)
        assert (await http.post("/auth/logout", headers=late.bearer())).status_code == 204
        deadline = time.monotonic() + 5
        while seq_on(sentinels.replica_port) == before:
            assert time.monotonic() < deadline, "the replica never got the logout"
            await asyncio.sleep(0.02)
        # The primary dies before the last logout reached its replica.
        forget_last_write(sentinels.replica_port, before)
        assert await status(http, kept.access) == 200

        caplog.set_level(logging.INFO, logger="service.store")
        sentinels.kill(sentinels.primary_port)
        killed = time.monotonic()
        unavailable: list[float] = []
        recovered = None
        while recovered is None or time.monotonic() - recovered < 2.0:
            assert time.monotonic() - killed < 30, "the service never recovered"
            for revoked in (early, late):
                assert await status(http, revoked.access) in {401, 503}, (
                    "a revoked token was accepted during the failover"
                )
            answer = await status(http, kept.access)
            assert answer in {200, 503}
            now = time.monotonic() - killed
            if answer == 503:
                unavailable.append(now)
                assert recovered is None, f"503 again {now - recovered:.2f} s after recovering"
            elif recovered is None and unavailable:
                recovered = now
            await asyncio.sleep(0.02)

        assert sentinels.primary() == sentinels.replica_port
        assert unavailable, "the failover went unnoticed"
        print(
            f"\nfailover: 503 from {unavailable[0]:.2f} s to {unavailable[-1]:.2f} s after the "
            f"primary was killed; 200 again at {recovered:.2f} s"
        )
        # The promoted replica answered with another run_id: the blocklist was reloaded
        # from the durable record, from the replica's own seq on.
        loaded = re.search(rf"durable record after #{before} in ([0-9.]+) s", caplog.text)
        assert loaded is not None, caplog.text
        print(f"the promoted replica was loaded from PostgreSQL in {loaded[1]} s")
        # The promoted replica was reloaded from the durable record: it holds the logout
        # it never received, and takes new ones.
        for revoked in (early, late):
            assert await status(http, revoked.access) == 401
        assert seq_on(sentinels.replica_port) >= before + 1
        assert (await http.post("/auth/logout", headers=kept.bearer())).status_code == 204
        assert await status(http, kept.access) == 401
        assert (await login(http, username, PASSWORD)).access

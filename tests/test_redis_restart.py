"""A Redis of our own, killed and restarted from its snapshot: revocations must not come back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis

from service.config import Settings
from tests.conftest import serve_in_process, settings_beside, two_sessions
from tests.servers import SnapshottingRedis


async def test_revocations_survive_a_crash_restored_from_an_old_snapshot(
    settings: Settings, snapshotting_redis: SnapshottingRedis, tmp_path: Path
) -> None:
    own = settings_beside(
        settings, tmp_path, redis_url=snapshotting_redis.url, redis_prefix="restart:"
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

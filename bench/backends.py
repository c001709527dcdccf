"""Throwaway backends for one run: a PostgreSQL database, a Redis key prefix, a TLS pair."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import redis

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL = "postgresql://postgres@127.0.0.1:5432/{name}"
REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Backends:
    """What one run owns: drop the database and delete the keys under prefix afterwards."""

    run_id: str
    db_name: str
    prefix: str
    cert: Path
    key: Path

    @property
    def database_url(self) -> str:
        """The service's DATABASE_URL."""
        return PG_URL.format(name=self.db_name)

    def redis_prefix(self, part: str) -> str:
        """A key prefix for one user of Redis in this run."""
        return f"{self.prefix}{part}:"


def create(workdir: Path) -> Backends:
    """Make a fresh database and a TLS pair; pick an unused Redis prefix."""
    from service.tls import ensure_dev_certificate

    run_id = secrets.token_hex(4)
    cert, key = ensure_dev_certificate(workdir)
    backends = Backends(
        run_id=run_id,
        db_name=f"authsvc_bench_{run_id}",
        prefix=f"bench:{run_id}:",
        cert=cert,
        key=key,
    )
    asyncio.run(_admin(f'CREATE DATABASE "{backends.db_name}"'))
    return backends


def drop(backends: Backends) -> int:
    """Drop the run's database and delete its Redis keys; returns the keys deleted."""
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{backends.db_name}" WITH (FORCE)'))
    return delete_keys(backends.prefix)


def delete_keys(prefix: str) -> int:
    """Delete every key under prefix (and nothing else)."""
    client = redis.Redis.from_url(REDIS_URL)
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.unlink(*batch)
            batch = []
    if batch:
        deleted += client.unlink(*batch)
    client.close()
    return deleted


def script_calls() -> int:
    """How many EVALSHA calls the shared Redis has served (every stack's check is one)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
    finally:
        client.close()
    return int(stats.get("calls", 0))


async def _admin(statement: str) -> None:
    """Run one statement on the maintenance database."""
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()

"""How long the blocklist takes to load from PostgreSQL into an empty Redis, and a catch-up.

Fills a throwaway database with N durable revocations (sessions, tokens and user cutoffs,
as logouts write them), then times the service's own recovery (Store.recover) into an
empty Redis prefix, beside the earlier load (one HSET and EXPIREAT per revocation, an
announcement per thousand) on the same rows, and a catch-up after the last 1% was lost.

    .venv/bin/python bench/rebuild.py [--count 1000000]

Writes bench/results/rebuild.md. Sends traffic only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from pathlib import Path

import asyncpg
import redis
from backends import PG_URL, REDIS_URL, _admin, delete_keys

RESULTS = Path(__file__).resolve().parent / "results"


def _settings(database: str, prefix: str, workdir: Path):
    from service.config import Environment, Settings

    return Settings(
        service_env=Environment.PRODUCTION,
        instance_dir=workdir,
        database_url=PG_URL.format(name=database),
        redis_url=REDIS_URL,
        redis_prefix=prefix,
        secret_key=secrets.token_urlsafe(48),
        jwt_secret=secrets.token_urlsafe(48),
        revocation_propagation_ms=0,
        jwt_issuer="https://127.0.0.1:8443",
    )


async def _fill(database: str, count: int) -> None:
    """count revocations: 80% sessions, 19% tokens, 1% user cutoffs, expiring over 30 days."""
    conn = await asyncpg.connect(PG_URL.format(name=database))
    try:
        await conn.execute(
            """
            INSERT INTO revocations (kind, subject, expires_at, cutoff_ms, created_at)
            SELECT CASE WHEN i % 100 = 0 THEN 'user' WHEN i % 5 = 0 THEN 'token'
                        ELSE 'session' END,
                   md5(i::text),
                   now() + (i % 2592000) * interval '1 second',
                   CASE WHEN i % 100 = 0 THEN (extract(epoch FROM now()) * 1000)::bigint END,
                   now() - interval '1 hour' + i * interval '1 millisecond'
            FROM generate_series(1, $1) AS i
            """,
            count,
        )
        await conn.execute("ANALYZE revocations")
    finally:
        await conn.close()


async def _recover(settings) -> float:
    """Seconds the service's recovery takes."""
    from service.loop import WorkerLoop
    from service.store import Store

    store = Store(settings, WorkerLoop())
    started = time.perf_counter()
    assert await store.recover()
    elapsed = time.perf_counter() - started
    await store.close()
    return elapsed


async def _earlier_load(settings) -> float:
    """The earlier load: one HSET and EXPIREAT per revocation, announced per thousand."""
    from service.store.blocklist import Kind, RedisBlocklist
    from service.store.db import Database
    from service.store.revocation_feed import message
    from service.store.revocations import stream_active

    blocklist = RedisBlocklist(
        REDIS_URL,
        prefix=settings.redis_prefix,
        shards=settings.revocation_shards,
        bucket_seconds=settings.revocation_bucket_seconds,
        timeout=5,
        max_connections=2,
    )
    client = blocklist._clients()
    database = Database(settings)
    started = time.perf_counter()
    batch = []
    async with database.session() as session:
        async for entry in stream_active(session):
            batch.append(entry)
            if len(batch) == 1000:
                async with client.pipeline(transaction=False) as pipe:
                    for item in batch:
                        if item.kind is Kind.USER:
                            pipe.set(blocklist.user_key(item.subject), item.cutoff_ms or 0)
                            continue
                        key = blocklist.bucket_key(item.kind, item.subject, item.expires_at)
                        pipe.hset(key, item.subject, 1)
                        pipe.expireat(key, blocklist.bucket_end(item.kind, item.expires_at))
                    pipe.publish(f"{settings.redis_prefix}revoked", message([], 0))
                    await pipe.execute()
                batch = []
    elapsed = time.perf_counter() - started
    await blocklist.close()
    await database.dispose()
    return elapsed


def _lose_tail(prefix: str, fraction: float) -> int:
    """Make Redis look like an older copy: lower its seq by a fraction of the rows."""
    client = redis.Redis.from_url(REDIS_URL)
    seq = int(client.get(f"{prefix}seq") or 0)
    lowered = int(seq * (1 - fraction))
    client.set(f"{prefix}seq", lowered)
    client.close()
    return seq - lowered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    args = parser.parse_args()
    run = secrets.token_hex(4)
    database, prefix = f"authsvc_bench_rebuild_{run}", f"bench:rebuild:{run}:"
    workdir = RESULTS / f"rebuild-{run}"
    workdir.mkdir(parents=True, exist_ok=True)
    asyncio.run(_admin(f'CREATE DATABASE "{database}"'))
    try:
        from service.store.migrate import upgrade

        settings = _settings(database, prefix, workdir)
        upgrade(settings)
        started = time.perf_counter()
        asyncio.run(_fill(database, args.count))
        filled = time.perf_counter() - started
        full = asyncio.run(_recover(settings))
        lost = _lose_tail(prefix, 0.01)
        catch_up = asyncio.run(_recover(settings))
        memory = redis.Redis.from_url(REDIS_URL).info("memory")["used_memory_human"]
        delete_keys(prefix)
        earlier = asyncio.run(_earlier_load(_settings(database, f"{prefix}earlier:", workdir)))
        delete_keys(f"{prefix}earlier:")
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        delete_keys(prefix)
    rows = [
        "| load | revocations | seconds | revocations/s |",
        "| --- | ---: | ---: | ---: |",
        f"| recovery into an empty Redis (ours) | {args.count:,} | {full:.1f} | "
        f"{args.count / full:,.0f} |",
        f"| earlier load, one HSET+EXPIREAT each (same rows) | {args.count:,} | {earlier:.1f} | "
        f"{args.count / earlier:,.0f} |",
        f"| catch-up after Redis lost the last {lost:,} (ours) | {lost:,} | {catch_up:.2f} | - |",
    ]
    report = "\n".join(
        [
            f"# Blocklist load, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"`bench/rebuild.py --count {args.count}`; filling PostgreSQL took {filled:.1f} s; "
            f"Redis used_memory after the load: {memory}.",
            "",
            *rows,
            "",
        ]
    )
    print(report)
    (RESULTS / "rebuild.md").write_text(report)


if __name__ == "__main__":
    main()

"""Redis memory per revoked token, written through the service's own RedisBlocklist.add.

Redis is shared: used_memory moves with other clients too, so the sum of MEMORY USAGE over
this run's keys is reported beside it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import redis
from backends import REDIS_URL, delete_keys

BATCH = 1000
EXPIRY_WAIT_S = 45
SETTLE_S = 0.3
ADD_RATE = 10_000  # revocations written per second here, conservatively


def _settings_default(name: str) -> int:
    """The service's default for a setting."""
    from service.config import Settings

    return int(Settings.model_fields[name].default)


def _blocklist(prefix: str, bucket_seconds: int):
    """The service's RedisBlocklist on a throwaway prefix."""
    from service.store.blocklist import RedisBlocklist

    return RedisBlocklist(
        REDIS_URL,
        prefix=prefix,
        shards=_settings_default("revocation_shards"),
        bucket_seconds=bucket_seconds,
        timeout=5.0,
        max_connections=4,
    )


def _entries(count: int, first_expiry: int, spread_s: int) -> Iterator[object]:
    """Session revocations (what logout writes), expiries spread evenly over spread_s."""
    from service.ids import new_id
    from service.store.blocklist import Entry, Kind

    for i in range(count):
        expires_at = first_expiry + (i * spread_s) // count
        yield Entry(kind=Kind.SESSION, subject=new_id(), expires_at=expires_at)


def _used_memory(client: redis.Redis) -> int:
    """Redis used_memory after a short settle."""
    time.sleep(SETTLE_S)
    return int(client.info("memory")["used_memory"])


def _key_bytes(client: redis.Redis, prefix: str) -> tuple[int, int]:
    """(number of keys, sum of MEMORY USAGE) under prefix."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    return len(keys), sum(int(size or 0) for size in pipe.execute())


async def _add_all(blocklist: object, entries: Iterator[object]) -> None:
    """Add entries in batches, as the service's rebuild does."""
    batch = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= BATCH:
            await blocklist.add(batch)  # type: ignore[attr-defined]
            batch = []
    if batch:
        await blocklist.add(batch)  # type: ignore[attr-defined]
    await blocklist.close()  # type: ignore[attr-defined]


def measure_layout(prefix: str, count: int, spread_s: int) -> dict[str, float]:
    """Bytes per revocation with production bucketing, expiries spread over spread_s."""
    client = redis.Redis.from_url(REDIS_URL)
    before = _used_memory(client)
    bucket = _settings_default("revocation_bucket_seconds")
    first = int(time.time()) + 3600
    asyncio.run(_add_all(_blocklist(prefix, bucket), _entries(count, first, spread_s)))
    return _tally(client, prefix, count, before)


def measure_expiry(prefix: str, count: int) -> dict[str, float]:
    """Add entries that expire within seconds, then wait for Redis to drop them."""
    client = redis.Redis.from_url(REDIS_URL)
    before = _used_memory(client)
    expires_at = int(time.time()) + 5 + count // ADD_RATE  # after they are all written
    asyncio.run(_add_all(_blocklist(prefix, 1), _entries(count, expires_at, 1)))
    loaded = _used_memory(client)
    waited = _wait_until_gone(client, prefix)
    after = _used_memory(client)
    left = _key_bytes(client, prefix)[0]
    delete_keys(prefix)
    client.close()
    return {
        "count": count,
        "loaded_per_entry": (loaded - before) / count,
        "after_expiry_bytes": after - before,
        "expiry_wait_s": waited,
        "keys_left": left,
    }


def _wait_until_gone(client: redis.Redis, prefix: str) -> float:
    """Seconds until no key is left under prefix (bounded)."""
    started = time.monotonic()
    while time.monotonic() - started < EXPIRY_WAIT_S:
        if next(iter(client.scan_iter(match=f"{prefix}*", count=1000)), None) is None:
            break
        time.sleep(0.5)
    return time.monotonic() - started


def measure_key_per_token(prefix: str, count: int) -> dict[str, float]:
    """The references' layout for comparison: one SET ... EX key per revoked jti."""
    import uuid

    client = redis.Redis.from_url(REDIS_URL)
    before = _used_memory(client)
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        pipe.set(f"{prefix}{uuid.uuid4()}", 1, ex=3600)
        if i % BATCH == BATCH - 1:
            pipe.execute()
    pipe.execute()
    return _tally(client, prefix, count, before)


def _tally(client: redis.Redis, prefix: str, count: int, before: int) -> dict[str, float]:
    """Bytes per entry under prefix since before; then delete the keys and close client."""
    after = _used_memory(client)
    keys, key_bytes = _key_bytes(client, prefix)
    delete_keys(prefix)
    client.close()
    return {
        "count": count,
        "keys": keys,
        "used_memory_per_entry": (after - before) / count,
        "memory_usage_per_entry": key_bytes / count,
    }

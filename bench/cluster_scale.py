"""Revocation check latency as the revoked set grows: one Redis server vs a 3-primary Cluster.

Starts its own Redis processes on free loopback ports (one server; three primaries with a
replica each) and grows the revoked set on both through the service's own bulk write path
(RedisBlocklist.rebuild / ClusterBlocklist.rebuild, batches of LOAD_BATCH), no HTTP, no
database: 80% sessions, 19% tokens, 1% user cutoffs as bench/rebuild.py, over --users users,
expiring over the next 30 days (from an hour on: nothing expires during the run). At each
size it checks --checks tokens never seen before (so no kept verdict answers: every check
is one EVALSHA), of users of that population and expiring in the loaded buckets, first one
at a time, then --concurrency at once, interleaved between the two setups in three rounds.
Blocklists are built with the service's defaults (shards, buckets, pool, propagation
window), but for a 5 s timeout so the load's large pipelines never time out;
--shards / --cluster-shards try another REVOCATION_SHARDS (written to
cluster_scale-shards<N>.md).

Reported per size: load time, keys held, Redis memory per revocation (sum of the
primaries' used_memory above the empty size), check p50/p99 (microseconds, client side)
sequential and concurrent, and the script's own time inside Redis (INFO commandstats
usec_per_call of EVALSHA): the part that would grow with the set if anything did.

    nice -n 10 env PYTHONPATH=. .venv/bin/python bench/cluster_scale.py \
        [--sizes 0,100000,1000000,10000000] [--single-up-to 10000000] [--checks 20000]

About 30 minutes for 10M on this (loaded, 2-core) machine, most of it the loads. Writes
bench/results/cluster_scale.md after every size. Sends traffic only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.config import Settings  # noqa: E402
from service.ids import new_id  # noqa: E402
from service.store.blocklist import Entry, Kind, RedisBlocklist, TokenRef, Verdict  # noqa: E402
from service.store.cluster_blocklist import ClusterBlocklist  # noqa: E402
from tests.servers import (  # noqa: E402
    RedisClusterGroup,
    one_server_and_a_cluster,
)

RESULTS = ROOT / "bench" / "results"
PREFIX = "scale:"
SPREAD = 30 * 86400  # seconds over which the revocations expire
MARGIN = 3600  # the first expiry, from the run's start
ROUNDS = 3
MIX = 2**64 - 59  # a prime: index -> id, deterministic and spread


def _default(name: str) -> int:
    return int(Settings.model_fields[name].default)


def _blocklist(kind: type[RedisBlocklist], url: str, shards: int) -> RedisBlocklist:
    """A blocklist as the service makes one (service.store._make_blocklist), timeout aside."""
    return kind(
        url,
        prefix=PREFIX,
        shards=shards,
        bucket_seconds=_default("revocation_bucket_seconds"),
        session_bucket_seconds=_default("revocation_session_bucket_seconds"),
        timeout=5.0,
        max_connections=_default("redis_pool_size"),
        propagation=_default("revocation_propagation_ms") / 1000,
        kept_verdicts=_default("verified_token_memo"),
    )


@dataclass(frozen=True)
class Population:
    """The revoked set: entry i is a deterministic function of i, the same for both setups."""

    users: int
    now: int

    def user(self, index: int) -> str:
        """The id of user number index."""
        return f"{(index * MIX) % 2**128:032x}"

    def entry(self, i: int) -> Entry:
        """Revocation number i."""
        user = self.user(i * 7919 % self.users)
        expires = self.now + MARGIN + i * 104729 % SPREAD
        if i % 100 == 0:
            cutoff = (self.now - 86400) * 1000  # before every session the checks use
            return Entry(Kind.USER, user, self.now + MARGIN + SPREAD, cutoff_ms=cutoff)
        subject = f"{(i * MIX + 1) % 2**128:032x}"
        kind = Kind.TOKEN if i % 5 == 0 else Kind.SESSION
        return Entry(kind, subject, expires, user=user)

    async def entries(self, start: int, stop: int) -> AsyncIterator[Entry]:
        """Revocations start..stop-1."""
        for i in range(start, stop):
            yield self.entry(i)

    def fresh(self, rng: random.Random) -> TokenRef:
        """A token never revoked nor checked, of a known user, expiring in loaded buckets."""
        exp = self.now + MARGIN + rng.randrange(SPREAD)
        sub = self.user(rng.randrange(self.users))
        return TokenRef(jti=new_id(), exp=exp, sid=new_id(), sxp=exp, sub=sub)

    def revoked(self, i: int) -> TokenRef:
        """A token that revocation number i covers (a token or session one)."""
        entry = self.entry(i)
        assert entry.user is not None
        other = new_id()
        if entry.kind is Kind.TOKEN:
            return TokenRef(entry.subject, entry.expires_at, other, entry.expires_at, entry.user)
        return TokenRef(other, entry.expires_at, entry.subject, entry.expires_at, entry.user)


@dataclass
class Setup:
    """One Redis setup under test: its blocklist, its primaries, and its results by size."""

    name: str
    blocklist: RedisBlocklist
    ports: list[int]
    loaded: int = 0
    base_memory: int = 0
    rows: dict[int, dict[str, str]] = field(default_factory=dict)


def _stats(ports: list[int]) -> tuple[int, int, int]:
    """EVALSHA calls and microseconds, and used_memory, summed over the servers on ports."""
    calls = usec = memory = 0
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port)
        try:
            stats = client.info("commandstats")
            memory += int(client.info("memory")["used_memory"])
        finally:
            client.close()
        evalsha = stats.get("cmdstat_evalsha", {})
        calls += int(evalsha.get("calls", 0))
        usec += int(evalsha.get("usec", 0))
    return calls, usec, memory


def _keys(ports: list[int]) -> int:
    """Keys held, summed over the servers on ports."""
    total = 0
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port)
        try:
            total += int(client.dbsize())
        finally:
            client.close()
    return total


async def _load(setup: Setup, population: Population, size: int) -> float:
    """Grow setup's revoked set to size; the seconds it took."""
    started = time.perf_counter()
    entries = population.entries(setup.loaded, size)
    assert await setup.blocklist.rebuild(entries), f"{setup.name}: the load lost its lock"
    setup.loaded = size
    return time.perf_counter() - started


async def _timed(blocklist: RedisBlocklist, refs: list[TokenRef], concurrency: int) -> list[float]:
    """Microseconds of each check of refs, concurrency at a time."""
    samples: list[float] = []
    pending = iter(refs)

    async def client() -> None:
        for ref in pending:
            started = time.perf_counter_ns()
            verdict = await blocklist.check(ref)
            samples.append((time.perf_counter_ns() - started) / 1000)
            assert verdict is Verdict.VALID, verdict

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _measure(
    setups: list[Setup], population: Population, size: int, checks: int, concurrency: int
) -> None:
    """Time fresh checks on every setup, interleaved, and note each one's row for size."""
    rng = random.Random(size)
    for setup in setups:
        # Connections, scripts and the feed's subscriptions in place before timing; and a
        # sample of what was loaded answers as it should.
        await _timed(setup.blocklist, [population.fresh(rng) for _ in range(200)], concurrency)
        for i in rng.sample(range(size), min(size, 50)):
            if population.entry(i).kind is not Kind.USER:
                assert await setup.blocklist.check(population.revoked(i)) is Verdict.REVOKED
    samples: dict[tuple[str, int], list[float]] = {}
    spent: dict[str, float] = {setup.name: 0.0 for setup in setups}
    redis_us: dict[str, list[int]] = {setup.name: [0, 0] for setup in setups}
    per_round = checks // ROUNDS
    for _ in range(ROUNDS):
        for width in (1, concurrency):
            for setup in setups:
                refs = [population.fresh(rng) for _ in range(per_round)]
                before = _stats(setup.ports)
                started = time.perf_counter()
                timed = await _timed(setup.blocklist, refs, width)
                if width == concurrency:
                    spent[setup.name] += time.perf_counter() - started
                after = _stats(setup.ports)
                samples.setdefault((setup.name, width), []).extend(timed)
                redis_us[setup.name][0] += after[0] - before[0]
                redis_us[setup.name][1] += after[1] - before[1]
    for setup in setups:
        _, _, memory = _stats(setup.ports)
        if size == 0:
            setup.base_memory = memory
        calls, usec = redis_us[setup.name]
        row = {
            "memory": "-" if size == 0 else f"{(memory - setup.base_memory) / size:,.0f}",
            "keys": f"{_keys(setup.ports):,}",
            "redis": f"{usec / max(calls, 1):.1f}",
            "calls": f"{calls / (2 * ROUNDS * per_round):.2f}",
            "rate": f"{ROUNDS * per_round / spent[setup.name]:,.0f}",
        }
        for width, label in ((1, "seq"), (concurrency, "conc")):
            timed = samples[(setup.name, width)]
            row[f"{label} p50"] = f"{statistics.median(timed):,.0f}"
            row[f"{label} p99"] = f"{_percentile(timed, 0.99):,.0f}"
        setup.rows[size] = setup.rows.get(size, {}) | row


async def _run(single_port: int, cluster: RedisClusterGroup, args: argparse.Namespace) -> None:
    population = Population(users=args.users, now=int(time.time()))
    single = Setup(
        "one server",
        _blocklist(RedisBlocklist, f"redis://127.0.0.1:{single_port}/0", args.shards),
        [single_port],
    )
    clustered = Setup(
        "3-primary Cluster",
        _blocklist(ClusterBlocklist, cluster.url, args.cluster_shards),
        cluster.primaries(),
    )
    started = time.perf_counter()
    try:
        for size in args.sizes:
            setups = [clustered] + ([single] if size <= args.single_up_to else [])
            for setup in setups:
                print(f"{setup.name}: loading {setup.loaded:,} -> {size:,}", flush=True)
                before = setup.loaded
                seconds = await _load(setup, population, size)
                added = size - before
                rate = f"{added / seconds:,.0f}/s" if added else "-"
                setup.rows[size] = {"load": f"{seconds:,.1f} s ({rate})"}
            print(f"measuring at {size:,}", flush=True)
            await _measure(setups, population, size, args.checks, args.concurrency)
            # After every size: what was measured stays if a later, larger load is stopped.
            _report([single, clustered], args, time.perf_counter() - started)
    finally:
        for setup in (single, clustered):
            await setup.blocklist.close()


COLUMNS = (
    "load",
    "keys",
    "memory",
    "seq p50",
    "seq p99",
    "conc p50",
    "conc p99",
    "rate",
    "redis",
    "calls",
)


def _table(setups: list[Setup], concurrency: int) -> list[str]:
    header = (
        "| revoked | Redis | load (added, rate) | keys | bytes per revocation | check p50 µs | "
        f"check p99 µs | p50 µs, {concurrency} at once | p99 µs, {concurrency} at once | "
        f"checks/s, {concurrency} at once | µs inside Redis per check | EVALSHA per check |"
    )
    lines = [header, "| ---: | --- |" + " ---: |" * len(COLUMNS)]
    sizes = sorted({size for setup in setups for size in setup.rows})
    for size in sizes:
        for setup in setups:
            row = setup.rows.get(size)
            if row is None or "redis" not in row:
                continue
            cells = " | ".join(row.get(column, "-") for column in COLUMNS)
            lines.append(f"| {size:,} | {setup.name} | {cells} |")
    return lines


def _report(setups: list[Setup], args: argparse.Namespace, seconds: float) -> None:
    """Print the table so far and write it to bench/results/cluster_scale.md."""
    command = (
        f"bench/cluster_scale.py --sizes {','.join(map(str, args.sizes))} "
        f"--single-up-to {args.single_up_to} --checks {args.checks} "
        f"--concurrency {args.concurrency} --users {args.users} "
        f"--shards {args.shards} --cluster-shards {args.cluster_shards}"
    )
    report = "\n".join(
        [
            f"# Revocation check latency vs revoked-set size, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"`{command}` ({seconds:,.0f} s so far). Checks of tokens never seen (one EVALSHA "
            "each), client-side microseconds from one process; the Cluster has three "
            "primaries with a replica each, all on this machine.",
            "",
            *_table(setups, args.concurrency),
            "",
        ]
    )
    print(report, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    shards = _default("revocation_shards")
    tried = "" if args.shards == args.cluster_shards == shards else f"-shards{args.cluster_shards}"
    (RESULTS / f"cluster_scale{tried}.md").write_text(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=lambda text: sorted(int(n) for n in text.split(",")),
        default=[0, 100_000, 1_000_000, 10_000_000],
    )
    parser.add_argument("--single-up-to", type=int, default=10_000_000)
    parser.add_argument("--checks", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--users", type=int, default=1_000_000)
    shards = _default("revocation_shards")
    parser.add_argument("--shards", type=int, default=shards, help="REVOCATION_SHARDS")
    parser.add_argument("--cluster-shards", type=int, default=shards)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        one_server_and_a_cluster(Path(tmp)) as (port, cluster),
    ):
        asyncio.run(_run(port, cluster, args))


if __name__ == "__main__":
    main()

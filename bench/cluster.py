"""Protected GET throughput and Redis commands per GET: one Redis server vs a 3-primary Cluster.

Starts its own Redis processes on free loopback ports (one server; then three primaries
with a replica each), a throwaway PostgreSQL database, and the app in process (ASGI, no
TLS: what differs is the revocation check). Each setup: one user logs in, then
--concurrency clients GET /api/hello for --seconds. From the primaries' INFO
commandstats, divided by the GETs: the check scripts run (EVALSHA: one round trip
each), and every command Redis ran (those inside scripts and background verification
included). Then --logouts sign-ins of that user, each followed by a timed logout: a
logout answers once the revocation is in force on every worker (see docs/revocation.md).

    PYTHONPATH=. .venv/bin/python bench/cluster.py [--seconds 5] [--concurrency 8] [--logouts 20]

With --server, the real server instead, once per setup, both running: `python -m service
serve` (Hypercorn, TLS, 2 workers, as bench/stacks.py starts it; --service-src another
tree), the protected GET driven by wrk over HTTP/1.1 (bench/drivers.py) for --seconds,
the setups interleaved for --rounds rounds (medians reported); then --logouts timed
logouts (a sign-in each, on a connection of its own) while wrk keeps both workers busy, so
that both are subscribed and a logout waits for both to acknowledge.

    PYTHONPATH=. .venv/bin/python bench/cluster.py --server [--seconds 10] [--rounds 3]

Sends traffic only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import backends  # noqa: E402
import client  # noqa: E402
import drivers  # noqa: E402
import stacks  # noqa: E402
from backends import PG_URL, _admin  # noqa: E402

from tests.servers import (  # noqa: E402
    RedisClusterGroup,
    one_server_and_a_cluster,
)

PASSWORD = "correct horse battery"
SECRET_KEY = secrets.token_urlsafe(48)  # one for every run: the database keeps what it sealed
JWT_SECRET = secrets.token_urlsafe(48)


def _default_window() -> int:
    from service.config import Settings

    return int(Settings.model_fields["revocation_propagation_ms"].default)


def _settings(database: str, redis_url: str, workdir: Path, propagation_ms: int):
    from service.config import Environment, Settings

    return Settings(
        service_env=Environment.PRODUCTION,
        instance_dir=workdir,
        database_url=PG_URL.format(name=database),
        redis_url=redis_url,
        redis_prefix="bench:",
        secret_key=SECRET_KEY,
        jwt_secret=JWT_SECRET,
        jwt_issuer="https://testserver",
        password_memory_kib=7168,
        password_time_cost=1,
        revocation_propagation_ms=propagation_ms,
    )


def _commands(ports: list[int]) -> tuple[int, int]:
    """Check scripts run and commands run, summed over the servers on ports."""
    scripts = total = 0
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port)
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        for name, values in stats.items():
            total += int(values["calls"])
            if name in ("cmdstat_evalsha", "cmdstat_eval"):
                scripts += int(values["calls"])
    return scripts, total


async def _run(settings, ports: list[int], seconds: float, concurrency: int, logouts: int) -> str:
    """A table row's numbers: GETs per second, scripts and commands per GET, logout times."""
    from service.server import build_asgi_app

    app = build_asgi_app(settings)
    await app.startup()
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://testserver")
    try:
        username = f"bench_{secrets.token_hex(4)}"
        created = await http.post(
            "/auth/register", json={"username": username, "password": PASSWORD}
        )
        assert created.status_code == 201, created.text
        login = await http.post("/auth/login", json={"username": username, "password": PASSWORD})
        headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
        assert (await http.get("/api/hello", headers=headers)).status_code == 200
        done = 0
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                response = await http.get("/api/hello", headers=headers)
                assert response.status_code == 200, response.status_code
                done += 1

        before = _commands(ports)
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        after = _commands(ports)
        times = []
        for _ in range(logouts):
            signed_in = await http.post(
                "/auth/login", json={"username": username, "password": PASSWORD}
            )
            bearer = {"Authorization": f"Bearer {signed_in.json()['access_token']}"}
            started = time.perf_counter()
            response = await http.post("/auth/logout", headers=bearer)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 204, response.status_code
    finally:
        await http.aclose()
        await app.shutdown()
    scripts, commands = (after[i] - before[i] for i in range(2))
    per_get = max(done, 1)
    logout = f"{statistics.median(times):.1f} | {max(times):.1f}" if times else "- | -"
    return f"{done / elapsed:,.0f} | {scripts / per_get:.2f} | {commands / per_get:.2f} | {logout}"


def _in_process(args: argparse.Namespace, port: int, cluster: RedisClusterGroup, workdir: Path):
    """The in-process table: each setup with kept verdicts and with every check asking."""
    from service.store.migrate import upgrade

    modes = (("kept verdicts (default)", _default_window()), ("every check asks", 0))
    database = f"authsvc_bench_cluster_{secrets.token_hex(4)}"
    asyncio.run(_admin(f'CREATE DATABASE "{database}"'))
    rows = []
    try:
        single_url = f"redis://127.0.0.1:{port}/0"
        upgrade(_settings(database, single_url, workdir, 0))
        for label, propagation in modes:
            settings = _settings(database, single_url, workdir, propagation)
            numbers = asyncio.run(
                _run(settings, [port], args.seconds, args.concurrency, args.logouts)
            )
            rows.append(f"| one server, {label} | {numbers} |")
        primaries = cluster.primaries()
        for label, propagation in modes:
            settings = _settings(database, cluster.url, workdir, propagation)
            numbers = asyncio.run(
                _run(settings, primaries, args.seconds, args.concurrency, args.logouts)
            )
            rows.append(f"| 3-primary Cluster, {label} | {numbers} |")
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    print(
        f"\nbench/cluster.py --seconds {args.seconds} --concurrency {args.concurrency} "
        f"--logouts {args.logouts}\n\n"
        "| Redis | protected GETs/s | check scripts per GET | Redis commands per GET "
        "| logout p50 ms | logout max ms |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    print("\n".join(rows))


def _timed_logouts(stack: stacks.Stack, context, count: int) -> list[float]:
    """Milliseconds of count logouts, each of a fresh sign-in, on a connection of its own."""
    times = []
    for _ in range(count):
        pair = client.login(stack.port, context)
        conn = client.connect(stack.port, context)
        try:
            started = time.perf_counter()
            status, body = client.call(conn, "POST", "/auth/logout", token=pair.access)
            times.append((time.perf_counter() - started) * 1000)
        finally:
            conn.close()
        assert status == 204, (status, body[:200])
    return times


def _served(args: argparse.Namespace, port: int, cluster: RedisClusterGroup, workdir: Path):
    """The real server per setup: GETs/s and latency from wrk, Redis commands, logouts."""
    run = backends.create(workdir)
    context = client.tls_context(run.cert)
    setups = {
        "one server": (f"redis://127.0.0.1:{port}/0", [port]),
        "3-primary Cluster": (cluster.url, cluster.primaries()),
    }
    servers = {}
    try:
        for name, (url, _) in setups.items():
            # One SECRET_KEY: it seals the OAuth signing keys both servers read from the database.
            extra = {"REDIS_URL": url, "REDIS_PREFIX": "bench:", "SECRET_KEY": SECRET_KEY}
            servers[name] = stack = stacks.ours(run, args.service_src, extra)
            stack.name = name.replace(" ", "-")
        stacks.migrate(next(iter(servers.values())))
        for stack in servers.values():
            stacks.start(stack, workdir)
        for stack in servers.values():
            stacks.wait_ready(stack, context)
        client.register(next(iter(servers.values())).port, context)
        tokens = {}
        for name, stack in servers.items():
            tokens[name] = pair = client.login(stack.port, context)
            client.smoke(stack.port, context, pair)
            drivers.get_h1(stack.url, pair.access, 2)  # warm-up: both workers, pools, feeds
        results: dict[str, list[tuple[drivers.Result, float, float]]] = {n: [] for n in servers}
        for _ in range(args.rounds):
            for name, stack in servers.items():
                before = _commands(setups[name][1])
                result = drivers.get_h1(stack.url, tokens[name].access, args.seconds)
                after = _commands(setups[name][1])
                assert result.non2xx == 0 and result.errors == 0, result
                per_get = max(result.requests, 1)
                scripts, commands = ((after[i] - before[i]) / per_get for i in range(2))
                results[name].append((result, scripts, commands))
        logouts = {}
        for name, stack in servers.items():
            load = drivers.wrk_start(
                f"{stack.url}/api/hello", "get.lua", [tokens[name].access], 60, connections=4
            )
            try:
                time.sleep(1)
                logouts[name] = _timed_logouts(stack, context, args.logouts)
            finally:
                load.terminate()
                load.wait(10)
    finally:
        for stack in servers.values():
            stacks.stop(stack)
        backends.drop(run)
    print(
        f"\nbench/cluster.py --server --seconds {args.seconds} --rounds {args.rounds} "
        f"--logouts {args.logouts} (service: {args.service_src})\n\n"
        "| Redis | protected GETs/s (median) | p50 ms | p99 ms | check scripts per GET "
        "| Redis commands per GET | logout p50 ms | logout max ms |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for name, rounds in results.items():
        rps = statistics.median(result.rps for result, _, _ in rounds)
        p50 = statistics.median(result.p50_ms for result, _, _ in rounds)
        p99 = statistics.median(result.p99_ms for result, _, _ in rounds)
        scripts = statistics.median(s for _, s, _ in rounds)
        commands = statistics.median(c for _, _, c in rounds)
        times = logouts[name]
        print(
            f"| {name} | {rps:,.0f} | {p50:.1f} | {p99:.1f} | {scripts:.2f} | {commands:.2f} "
            f"| {statistics.median(times):.1f} | {max(times):.1f} |"
        )
    print(
        "\nrounds (GETs/s): "
        + "; ".join(
            f"{name} " + ", ".join(f"{result.rps:,.0f}" for result, _, _ in rounds)
            for name, rounds in results.items()
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--logouts", type=int, default=20)
    parser.add_argument("--server", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--service-src", type=Path, default=ROOT)
    args = parser.parse_args()
    if args.seconds is None:
        args.seconds = 10.0 if args.server else 5.0
    if args.server and drivers.missing_tools():
        sys.exit(f"apt-get install {' '.join(drivers.missing_tools())}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with one_server_and_a_cluster(workdir) as (port, cluster):
            (_served if args.server else _in_process)(args, port, cluster, workdir)


if __name__ == "__main__":
    main()

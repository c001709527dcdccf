"""Where our workers spend their CPU on one operation, sampled with py-spy under wrk.

    .venv/bin/python bench/hotspots.py refresh      # get | refresh | logout | client_credentials

Starts our service alone (TLS, 2 workers, a database and Redis prefix of its own), loads it
over HTTP/1.1 with wrk as bench/run.py does, samples the thread holding the GIL in each
worker for --seconds, and prints each function's share of the samples: on the stack
(inclusive) and at its top (own time; C code counts for the Python function calling it).
Logout spends a session per request: the sessions are minted first (about 90 logins a
second), so keep its --seconds short.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import backends
import client
import drivers
import spy
import stacks
from drivers import Result
from stacks import Stack

REPO = Path(__file__).resolve().parent.parent
LOGOUTS_PER_SECOND = 1500  # sessions minted per second of a logout profile: more than it uses
WARM_UP_S = 1.0


def main(argv: list[str] | None = None) -> int:
    """Profile one operation; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", choices=["get", "refresh", "logout", "client_credentials"])
    parser.add_argument("--seconds", type=int, default=None, help="sampling time (10; logout 3)")
    parser.add_argument("--top", type=int, default=60, help="functions listed per table")
    args = parser.parse_args(argv)
    seconds = args.seconds or (3 if args.op == "logout" else 10)
    if spy.py_spy() is None or drivers.missing_tools():
        print("needs py-spy (requirements/bench.txt) and wrk (apt-get install -y wrk)")
        return 2
    with tempfile.TemporaryDirectory(prefix="authsvc-profile-") as tmp:
        workdir = Path(tmp)
        setup = backends.create(workdir)
        ours = stacks.ours(setup, REPO)
        try:
            stacks.migrate(ours)
            stacks.start(ours, workdir)
            stacks.wait_ready(ours, client.tls_context(setup.cert))
            load = _load(args.op, ours, setup, workdir, seconds + 2 * WARM_UP_S)
            _print(args.op, *_sample(ours, load, workdir, seconds, args.top))
        finally:
            stacks.stop(ours)
            backends.drop(setup)
    return 0


def _load(
    op: str, ours: Stack, setup: backends.Backends, workdir: Path, seconds: float
) -> Callable[[], Result]:
    """Prepare op's tokens; returns the run that loads the service for about seconds."""
    context = client.tls_context(setup.cert)
    if op == "client_credentials":
        oauth = stacks.create_oauth_client(ours)
        body = [client.OAUTH_BODY, oauth.basic]
        return lambda: drivers.wrk(f"{ours.url}/oauth/token", "oauth.lua", body, seconds)
    client.register(ours.port, context)
    if op == "get":
        token = client.login(ours.port, context).access
        return lambda: drivers.get_h1(ours.url, token, seconds)
    if op == "refresh":
        seeds = [client.login(ours.port, context).refresh for _ in range(2 * drivers.CONNECTIONS)]
        return lambda: drivers.wrk_chain(f"{ours.url}/auth/refresh", seeds, seconds)
    wanted = int(seconds * LOGOUTS_PER_SECOND)
    out = workdir / "mint-"
    print(f"minting {wanted} sessions...", file=sys.stderr)
    sessions: list[client.Pair] = []
    while len(sessions) < wanted:
        drivers.wrk(f"{ours.url}/auth/login", "login.lua", [client.LOGIN_BODY, str(out)], 10)
        sessions += client.read_pairs(out)
    tokens = [pair.access for pair in sessions]
    return lambda: drivers.wrk_tokens(f"{ours.url}/auth/logout", tokens, 10 * seconds)


def _sample(
    ours: Stack, load: Callable[[], Result], workdir: Path, seconds: int, top: int
) -> tuple[Result, int, list[tuple[str, float]], list[tuple[str, float]]]:
    """Run load in the background and sample the workers meanwhile."""
    results: list[Result] = []
    running = threading.Thread(target=lambda: results.append(load()))
    running.start()
    time.sleep(WARM_UP_S)
    executable = spy.py_spy()
    assert executable is not None
    paths = spy.record(executable, stacks.worker_pids(ours), seconds, workdir, gil=True)
    running.join()
    return (results[0], *spy.by_function(paths, top))


def _print(
    op: str,
    result: Result,
    samples: int,
    inclusive: list[tuple[str, float]],
    own: list[tuple[str, float]],
) -> None:
    """The load's result and both tables."""
    print(
        f"# {op}: {result.rps:,.0f} req/s under wrk (p50 {result.p50_ms:.1f} ms), "
        f"{samples} samples\n"
    )
    for title, rows in (("on the stack", inclusive), ("own time", own)):
        print(f"| {title} | function |\n| ---: | --- |")
        for name, share in rows:
            print(f"| {share:.1%} | `{name}` |")
        print()


if __name__ == "__main__":
    sys.exit(main())

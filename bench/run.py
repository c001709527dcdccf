"""Benchmark: our service against two reference stacks, runs interleaved.

    .venv/bin/python bench/run.py [--quick] [--profile]

Starts our service (production settings, Hypercorn, 2 workers, TLS) and the references
(ref_flask.py under gunicorn gthread, ref_fastapi.py under uvicorn) on 127.0.0.1 with a
throwaway database and Redis prefix, drives them with wrk (HTTP/1.1) and h2load (HTTP/2),
prints one report and writes it to bench/results/latest.md (raw numbers: latest.json).
Stops everything it started, drops its database and deletes its Redis keys, even on failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import backends
import checks
import client
import cpu
import drivers
import h2post
import readme
import revmem
import spy
import stacks
import targets
from client import Pair
from drivers import Result
from report import (
    CLIENT_CREDENTIALS,
    GET,
    H1,
    H2,
    LOGIN,
    LOGOUT,
    NO_CHECK,
    OURS,
    REFRESH,
    Report,
    pooled,
    render,
)
from stacks import Stack

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
# What serves and parses each stack's requests, named in the report.
SERVER_PACKAGES = (
    "hypercorn",
    "h11",
    "h2",
    "gunicorn",
    "uvicorn",
    "httptools",
    "uvloop",
    "fastapi",
)
NO_CHECK_SETTING = "revocation_check"  # Settings field: run "ours, no check" if present

TOKEN_RUN_LIMIT_S = 60.0
LOPSIDED = 0.9  # a run where one worker spent this share of the workers' CPU is noted
# Refresh chains: two per wrk connection; one per HTTP/2 stream and one spare per connection.
CHAIN_SEEDS = {H1: 2 * drivers.CONNECTIONS, H2: drivers.H2_CLIENTS * (drivers.H2_STREAMS + 1)}
MIN_LOGIN_RATE = 20.0
STARTED = time.monotonic()
NOTES = [
    "Load generators share the 2 cores with the servers: compare ratios, not absolutes. "
    "Runs are interleaved (ours, ref a, ref b, ours, ...); GET runs are short (2 s) and "
    "come in passes, 4 per round, each stack next to its no-check twin and the order "
    "reversed every pass. 'CPU while measuring' above says how much of the machine other "
    "processes took meanwhile (the machine may be shared); the speed probe is a fixed loop "
    "on one core, timed while nothing runs: slower after than before means the host "
    "itself got slower during the run, which no process list shows.",
    "HTTP/1.1: wrk -t2 -c16 (keep-alive). HTTP/2: h2load -c16 -m4 for GET, login and "
    "client_credentials (as many connections as wrk: a connection stays on one worker); "
    "refresh and logout need a new token per request, which h2load cannot send, so their "
    "HTTP/2 rows come from bench/h2post.py (Python h2 client, 16 connections x 4 streams).",
    "ref b (uvicorn) speaks no HTTP/2: n/a. ref a serves HTTP/2 through gunicorn's h2 support, "
    "which stalls under h2load's 16 connections: after its first stall, its later h2load runs "
    "are skipped (n/a).",
    "Login: ours reads the user from PostgreSQL and writes a session row; the references "
    "verify one in-memory Argon2id hash (same parameters). Refresh/logout: ours writes "
    "PostgreSQL (rotation, durable revocation) and Redis; the references one Redis SET.",
    "client_credentials (HTTP Basic client authentication, scope email): ours reads the "
    "client from PostgreSQL (Authlib) and keeps it while the revocation feed is fresh, for "
    "5 s at most (a change is announced to every worker), and signs the ES256 access token "
    "with a key loaded from PostgreSQL (kept in memory, reread every 5 s); the references "
    "use one in-memory client (secret as a SHA-256 digest, like ours) and a P-256 key "
    "generated at start-up (bench/ref_oauth.py). Ours' token carries a few more claims "
    "(nbf, sid, sxp, type, name).",
    "Refresh runs are chains: each connection (HTTP/2: each stream) sends a refresh token, "
    "then the one its answer returned, for the whole run, from a few seed sessions. Logout "
    "runs use each access token once, from sessions of their own: logout tokens/run above.",
    "HTTP/1.1 runs of client_credentials, refresh and logout where one worker did 90% or more "
    "of its server's work are named at the top: gunicorn's workers share one listening "
    "socket, and in some runs one of them takes every connection while the other core idles "
    "(ref a's slow mode, docs/performance.md). A pair with such a run is shown in the targets "
    "but not judged: it compares one server's mode, not the two servers.",
    "Ours runs with ACCESS_LOG=false, like its no-check twin and the references (which log "
    "nothing per request); with the access log on, production's default, a GET costs about "
    "5-10% more (docs/performance.md).",
]


@dataclass(frozen=True)
class Plan:
    """How long and how much: the full run or --quick."""

    rounds: int
    get_passes: int  # GET runs per stack and protocol in each round, order alternating
    get_s: float
    login_s: float
    oauth_s: float
    storm_s: float
    token_cap: int  # logout tokens per run, at most
    refresh_s: float
    check_n: int
    mem_n: int
    mint_limit_s: float
    profile_s: int
    warm_up_s: float
    storm_refs: bool
    side_by_side_runs: int
    side_by_side_s: float


FULL = Plan(
    rounds=3,
    get_passes=4,
    get_s=2,
    login_s=5,
    oauth_s=4,  # 3 rounds x 5 runs x 4 s: about a minute (login's 5 s would take 75 s)
    storm_s=6,
    token_cap=600,
    refresh_s=3,
    check_n=1000,
    mem_n=100_000,
    mint_limit_s=40,
    profile_s=10,
    warm_up_s=2,
    storm_refs=True,
    side_by_side_runs=5,
    side_by_side_s=4,
)
QUICK = dataclasses.replace(
    FULL,
    rounds=1,
    get_passes=2,
    get_s=2,
    login_s=3,
    oauth_s=3,
    storm_s=3,
    token_cap=100,
    refresh_s=2,
    check_n=200,
    mem_n=10_000,
    mint_limit_s=5,
    profile_s=5,
    warm_up_s=1,
    storm_refs=False,
    side_by_side_runs=2,
    side_by_side_s=3,
)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = _parser().parse_args(argv)
    missing = drivers.missing_tools()
    if missing:
        packages = " ".join(missing)
        print(f"missing load generators; install: apt-get update && apt-get install -y {packages}")
        return 2
    sys.path.insert(0, str(args.service_src.resolve()))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill, too
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="authsvc-bench-") as tmp:
        report = Bench(QUICK if args.quick else FULL, args, Path(tmp)).run()
    text = render(report, targets.render(report))
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.md").write_text(text)
    dump_json(report, RESULTS / "latest.json")
    if not args.quick:  # a quick run is too short to stand for the service
        readme.publish(text)
    log(f"wrote {RESULTS / 'latest.md'}; {time.monotonic() - started:.0f} s in all")
    return 0


def _parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="about 3 minutes: one short round")
    parser.add_argument("--profile", action="store_true", help="also sample our workers (py-spy)")
    parser.add_argument(
        "--service-src", type=Path, default=REPO, help="checkout whose service/ to run"
    )
    return parser


def log(message: str) -> None:
    """Progress on stderr, so that stdout holds only the report."""
    elapsed = time.monotonic() - STARTED
    print(f"[bench {elapsed:5.0f}s] {message}", file=sys.stderr, flush=True)


LOGIN_DRAIN_S = 3.0


class Bench:
    """One run: owns its servers, database and Redis prefix from start to cleanup."""

    def __init__(self, plan: Plan, args: argparse.Namespace, workdir: Path) -> None:
        """Plan the run; nothing is started yet."""
        self.plan, self.args, self.workdir = plan, args, workdir
        self.stacks: list[Stack] = []
        self.tokens: dict[str, Pair] = {}
        self.oauth: dict[str, client.OAuthClient] = {}
        self.h2_stalled: set[str] = set()
        self.pools: dict[str, list[Pair]] = {}
        self.slices: dict[tuple[int, str, str], list[Pair]] = {}
        self.seeds: dict[tuple[int, str, str], list[Pair]] = {}
        self.check_pairs: list[Pair] = []
        self.check_calls = self.check_requests = 0
        now = dt.datetime.now().isoformat(timespec="seconds")
        mode = "quick" if args.quick else "full"
        meta = {"mode": mode, "date": now, "cores": os.cpu_count(), "rounds": plan.rounds}
        meta |= {"versions": _versions()}
        self.report = Report(meta=meta, labels={})

    def run(self) -> Report:
        """Every phase, with cleanup whatever happens."""
        self.backends = backends.create(self.workdir)
        self.report.meta["run"] = self.backends.run_id
        try:
            self._memory()
            self._start_stacks()
            groups = {s.process.pid for s in self.stacks if s.process}
            probe_before = cpu.probe_seconds()
            before = cpu.snapshot(groups)
            self._measure()
            used = cpu.shares(before, cpu.snapshot(groups))
            self.report.meta["CPU while measuring"] = ", ".join(
                f"{name} {share:.0%}" for name, share in used.items()
            )
            self.report.meta["speed probe before / after the load"] = (
                f"{probe_before:.2f} s / {cpu.probe_seconds():.2f} s"
            )
        finally:
            self._cleanup()
        self.report.notes += self._notes()
        return self.report

    def _measure(self) -> None:
        """The measurements, in order."""
        self._throughput_rounds()
        self._storm()
        self._check_side_by_side()
        self._token_rounds()
        self._logout_check()
        if self.args.profile:
            self._profile()

    def _notes(self) -> list[str]:
        """How to read the report, plus what this run found about the check."""
        notes = list(NOTES)
        with_check = self.report.results.get((GET, H1, "flask"))
        without = self.report.results.get((GET, H1, "flask-nocheck"))
        if with_check and without:
            a, b = pooled(with_check).rps, pooled(without).rps
            notes.append(
                f"Cost of the Redis revocation check in ref a (HTTP/1.1 GET): {a:,.0f} req/s "
                f"with, {b:,.0f} without ({1 - a / b:.0%} of throughput)."
            )
        if NO_CHECK not in self.report.labels:
            notes.append(
                "Ours without its revocation check is not measured: the service has no "
                f"`{NO_CHECK_SETTING.upper()}` setting yet (this run adds that row once it has)."
            )
        return notes

    # --- set-up and cleanup ------------------------------------------------------------

    def _start_stacks(self) -> None:
        """Start every server, wait until ready, and sign in once on each."""
        self.stacks = [
            stacks.ours(self.backends, self.args.service_src),
            stacks.ref_flask(self.backends),
            stacks.ref_fastapi(self.backends),
            stacks.ref_flask(self.backends, check=False),
        ]
        if _service_has(NO_CHECK_SETTING):
            # The service refuses to skip the check in production: the same settings otherwise,
            # SECRET_KEY included (it encrypts the OAuth signing keys both read from PostgreSQL).
            extra = {NO_CHECK_SETTING.upper(): "false", "SERVICE_ENV": "development"}
            extra["SECRET_KEY"] = self.stacks[0].env["SECRET_KEY"]
            nocheck = stacks.ours(self.backends, self.args.service_src, extra)
            nocheck.name, nocheck.label, nocheck.check = NO_CHECK, "ours, no check", False
            self.stacks.append(nocheck)
        stacks.migrate(self.stacks[0])
        ours_client = stacks.create_oauth_client(self.stacks[0])
        for stack in self.stacks:  # the references' fixed client, or the one just created
            env = stack.env
            fixed = "BENCH_CLIENT_ID" in env
            self.oauth[stack.name] = (
                client.OAuthClient(env["BENCH_CLIENT_ID"], env["BENCH_CLIENT_SECRET"])
                if fixed
                else ours_client
            )
        self.context = client.tls_context(self.backends.cert)
        for stack in self.stacks:
            stacks.start(stack, self.workdir)
        for stack in self.stacks:
            stacks.wait_ready(stack, self.context)
            self.report.labels[stack.name] = stack.label
            if not stack.check:
                self.report.partial.add(stack.name)
        self._prepare_accounts()
        log("servers ready: " + ", ".join(f"{s.name}:{s.port}" for s in self.stacks))

    def _prepare_accounts(self) -> None:
        """Create our user, get a token pair per stack, smoke-test, warm up."""
        client.register(self.stacks[0].port, self.context)
        for stack in self.stacks:
            pair = client.login(stack.port, self.context)
            client.smoke(stack.port, self.context, pair)
            if stack.check:  # the stacks client_credentials is measured on
                client.client_credentials(stack.port, self.context, self.oauth[stack.name])
            self.tokens[stack.name] = pair
            self.pools[stack.name] = []
            self._get_h1(stack, self.plan.warm_up_s)  # warm-up: both workers, pools, caches

    def _cleanup(self) -> None:
        """Stop every server and remove the run's database and keys."""
        for stack in self.stacks:
            try:
                stacks.stop(stack)
            except Exception as exc:  # keep stopping the others
                log(f"could not stop {stack.name}: {exc}")
        deleted = backends.drop(self.backends)
        log(f"stopped {len(self.stacks)} servers, dropped the database, deleted {deleted} keys")

    # --- protected GET and login -------------------------------------------------------

    @property
    def main_stacks(self) -> list[Stack]:
        """The stacks that serve the whole API (with their revocation check)."""
        return [s for s in self.stacks if s.check]

    def _memory(self) -> None:
        """Redis bytes per revocation, before any server runs."""
        n = self.plan.mem_n
        log(f"revocation memory over {n:,} revocations")
        prefix = self.backends.redis_prefix("mem")
        self.report.memory = {
            "ours, expiries within 15 min": revmem.measure_layout(prefix + "burst:", n, 900),
            "ours, expiries over 1 day": revmem.measure_layout(prefix + "day:", n, 86400),
            "refs: one key per token": revmem.measure_key_per_token(prefix + "keys:", n),
            "expiry": revmem.measure_expiry(prefix + "expiry:", n),
        }

    def _throughput_rounds(self) -> None:
        """Protected GET, login and client_credentials, every stack in turn, each round."""
        for round_no in range(self.plan.rounds):
            what = "protected GET, login, client_credentials"
            log(f"round {round_no + 1}/{self.plan.rounds}: {what}")
            for get_pass in range(self.plan.get_passes):
                order = self._round_order(round_no * self.plan.get_passes + get_pass)
                for stack in order:
                    self.report.add(GET, H1, stack.name, self._counted_get_h1(stack))
                for stack in order:
                    self._h2(GET, stack, self._get_h2)
            for stack in self.main_stacks:
                self.report.add(LOGIN, H1, stack.name, self._login_h1(stack, self.plan.login_s))
            for stack in self.main_stacks:
                self._h2(LOGIN, stack, self._login_h2)
            # h2load leaves up to 64 logins per server queued for hashing when it stops; the
            # next run would share the CPU with them for a second or two.
            time.sleep(LOGIN_DRAIN_S)
            for stack in self.main_stacks:
                result = self._watching_workers(CLIENT_CREDENTIALS, stack, self._oauth_h1)
                self.report.add(CLIENT_CREDENTIALS, H1, stack.name, result)
            for stack in self.main_stacks:
                self._h2(CLIENT_CREDENTIALS, stack, self._oauth_h2)

    def _h2(self, op: str, stack: Stack, run: Callable[[Stack], Result]) -> None:
        """One HTTP/2 run; a stack that stalled once under HTTP/2 load is n/a from then on.

        (gunicorn's HTTP/2 support stalls with 16 connections; each stall costs h2load's
        whole timeout, which made the full run twice as long.)
        """
        if not stack.h2 or stack.name in self.h2_stalled:
            return
        try:
            self.report.add(op, H2, stack.name, run(stack))
        except RuntimeError as exc:
            self.h2_stalled.add(stack.name)
            log(f"{stack.name}: HTTP/2 {op} gave no result ({str(exc).splitlines()[0]}): n/a")

    def _round_order(self, pass_no: int) -> list[Stack]:
        """Each stack next to its no-check twin, the order reversed every other pass.

        The check's cost is a small difference between two runs: run them back to back,
        and alternate which goes first, so that the machine's drift cancels out. Short
        runs, many passes: this machine's throughput swings by 10-20% from run to run.
        """
        order = sorted(self.stacks, key=lambda s: (s.name.split("-")[0], not s.check))
        return order[::-1] if pass_no % 2 else order

    def _counted_get_h1(self, stack: Stack) -> Result:
        """Protected GET over HTTP/1.1, counting the Redis check calls ours made for it."""
        if stack.name != OURS:
            return self._get_h1(stack, self.plan.get_s)
        calls = backends.script_calls()
        result = self._get_h1(stack, self.plan.get_s)
        self.check_calls += backends.script_calls() - calls
        self.check_requests += result.requests
        share = self.check_calls / max(1, self.check_requests)
        self.report.meta["Redis check calls per protected GET (ours, HTTP/1.1)"] = (
            f"{share:.4f} ({self.check_calls:,} for {self.check_requests:,} requests)"
        )
        return result

    def _get_h1(self, stack: Stack, seconds: float) -> Result:
        """Protected GET over HTTP/1.1 (wrk)."""
        return drivers.get_h1(stack.url, self.tokens[stack.name].access, seconds)

    def _get_h2(
        self, stack: Stack, seconds: float | None = None, streams: int = drivers.H2_STREAMS
    ) -> Result:
        """Protected GET over HTTP/2 (h2load), for the plan's GET run unless told."""
        duration = self.plan.get_s if seconds is None else seconds
        return drivers.get_h2(stack.url, self.tokens[stack.name].access, duration, streams)

    def _login_h1(self, stack: Stack, seconds: float) -> Result:
        """wrk login that also keeps every token pair handed out (for refresh and logout)."""
        out = self._mint_prefix(stack)
        args = [client.LOGIN_BODY, str(out)]
        result = drivers.wrk(f"{stack.url}/auth/login", "login.lua", args, seconds)
        self._collect(stack.name, out)
        return result

    def _login_h2(self, stack: Stack) -> Result:
        """Login over HTTP/2 (h2load; its tokens are not kept)."""
        headers = ["content-type: application/json"]
        url = f"{stack.url}/auth/login"
        return drivers.h2load(url, self.plan.login_s, headers, client.LOGIN_BODY)

    def _oauth_h1(self, stack: Stack) -> Result:
        """client_credentials token request over HTTP/1.1 (wrk)."""
        args = [client.OAUTH_BODY, self.oauth[stack.name].basic]
        return drivers.wrk(f"{stack.url}/oauth/token", "oauth.lua", args, self.plan.oauth_s)

    def _oauth_h2(self, stack: Stack) -> Result:
        """client_credentials token request over HTTP/2 (h2load)."""
        headers = [f"content-type: {client.FORM}"]
        headers.append(f"authorization: {self.oauth[stack.name].basic}")
        url = f"{stack.url}/oauth/token"
        return drivers.h2load(url, self.plan.oauth_s, headers, client.OAUTH_BODY)

    def _mint_prefix(self, stack: Stack) -> Path:
        """A fresh file prefix for the token pairs of one login run."""
        return self.workdir / f"mint-{stack.name}-{time.monotonic_ns()}-"

    def _collect(self, name: str, out: Path) -> None:
        """Read the token pairs a login run wrote (one file per wrk thread)."""
        self.pools[name].extend(client.read_pairs(out))

    def _storm(self) -> None:
        """Protected GET p99 alone, then while logins hammer the same server; every round.

        One short run per stack scattered from 0.8x to 3.3x between identical set-ups: the
        ratio is taken per round and the report gives their median.
        """
        log("protected GET alone vs during a login storm")
        for round_no in range(self.plan.rounds):
            # The references' storms are for comparison only: they storm in the first round.
            refs = self.plan.storm_refs and round_no == 0
            storming = self.main_stacks if refs else self.main_stacks[:1]
            for stack in storming if round_no % 2 == 0 else storming[::-1]:
                alone = self._get_h1(stack, self.plan.storm_s)
                out = self._mint_prefix(stack)
                url, args = f"{stack.url}/auth/login", [client.LOGIN_BODY, str(out)]
                storm = drivers.wrk_start(url, "login.lua", args, self.plan.storm_s + 1)
                time.sleep(0.5)
                during = self._get_h1(stack, self.plan.storm_s)
                login = drivers.wrk_finish(storm, self.plan.storm_s + 30)
                self._collect(stack.name, out)
                runs = self.report.storm.setdefault(stack.name, {})
                for kind, result in (("alone", alone), ("during", during), ("login", login)):
                    runs.setdefault(kind, []).append(result)
                time.sleep(LOGIN_DRAIN_S)  # the next run must not share the CPU with its logins

    def _check_side_by_side(self) -> None:
        """Ours and its no-check twin under load at the same time.

        Both share whatever the machine gives at that moment, so its swings from run to run
        cancel out of the ratio: with equal CPU shares, the throughput ratio is the inverse
        ratio of their CPU per request. Each twin gets the usual 16 connections: the kernel
        spreads a stack's connections over its workers at random, and with 8 a worker
        sometimes got one or none, which cost its stack half the CPU whatever it checked.
        Over HTTP/2 each connection carries half the usual streams: four workers share the
        two cores here, and a worker with a full run's streams on half a core takes twice
        as long per loop iteration as in a run of its own, long enough for its kept
        verdicts to go stale (see revocation_feed.py) where the same load alone does not.
        """
        twins = [s for s in self.stacks if s.name in (OURS, NO_CHECK)]
        if len(twins) != 2:
            return
        log("revocation check's cost: ours and its no-check twin side by side")
        with ThreadPoolExecutor(2) as pool:
            for _ in range(self.plan.side_by_side_runs):
                for protocol in (H1, H2):
                    runs = {
                        stack.name: pool.submit(self._twin_load, stack, protocol) for stack in twins
                    }
                    for name, run in runs.items():
                        self.report.side_by_side.setdefault((protocol, name), []).append(
                            run.result()
                        )

    def _twin_load(self, stack: Stack, protocol: str) -> Result:
        """A GET run of one twin, while the other runs too."""
        seconds = self.plan.side_by_side_s
        if protocol == H1:
            return self._get_h1(stack, seconds)
        return self._get_h2(stack, seconds, streams=drivers.H2_STREAMS // 2)

    # --- refresh chains, and logout with one fresh token per request -------------------

    def _token_rounds(self) -> None:
        """Refresh chains for a fixed time, then logout, one fresh token per request."""
        self._top_up()
        self._slice_pools()
        log(f"{REFRESH}: refresh chains, {self.plan.refresh_s:g} s per run")
        for round_no in range(self.plan.rounds):
            for protocol in (H1, H2):
                for stack in self.main_stacks:
                    self._refresh_run(round_no, protocol, stack)
        log(f"{LOGOUT}: one fresh token per request")
        for round_no in range(self.plan.rounds):
            for protocol in (H1, H2):
                for stack in self.main_stacks:
                    self._logout_run(round_no, protocol, stack)

    def _refresh_run(self, round_no: int, protocol: str, stack: Stack) -> None:
        """One run of refresh chains from one slice of seed sessions."""
        pairs = self.seeds.get((round_no, protocol, stack.name))
        if pairs:
            seeds = [p.refresh for p in pairs]
            self._post(REFRESH, "/auth/refresh", protocol, stack, seeds, self.plan.refresh_s)

    def _logout_run(self, round_no: int, protocol: str, stack: Stack) -> None:
        """One logout run over one slice of sessions, each access token once."""
        pairs = self.slices.get((round_no, protocol, stack.name))
        if pairs:
            self._post(LOGOUT, "/auth/logout", protocol, stack, [p.access for p in pairs], None)

    def _post(
        self,
        op: str,
        path: str,
        protocol: str,
        stack: Stack,
        tokens: list[str],
        chain_s: float | None,
    ) -> None:
        """POST path with Bearer tokens: refresh chains for chain_s, or each token once."""
        cert, url = self.backends.cert, f"{stack.url}{path}"
        if protocol == H1 and chain_s is not None:
            result = self._watching_workers(
                op, stack, lambda _: drivers.wrk_chain(url, tokens, chain_s)
            )
        elif protocol == H1:
            result = self._watching_workers(
                op, stack, lambda _: drivers.wrk_tokens(url, tokens, TOKEN_RUN_LIMIT_S)
            )
        elif chain_s is not None:
            result = h2post.post_chains(stack.port, path, tokens, cert, chain_s)
        else:
            result = h2post.post_tokens(stack.port, path, tokens, cert, TOKEN_RUN_LIMIT_S)
        self.report.add(op, protocol, stack.name, result)

    def _watching_workers(self, op: str, stack: Stack, run: Callable[[Stack], Result]) -> Result:
        """One HTTP/1.1 run, noting it in the report when one worker did nearly all the work.

        A server whose workers share one listening socket (gunicorn) may hand every
        connection of a run to one worker: the other core idles and the run is slow.
        """
        before = cpu.worker_ticks(stacks.worker_pids(stack))
        result = run(stack)
        spent = [max(0, t - before.get(pid, 0)) for pid, t in cpu.worker_ticks(before).items()]
        index = len(self.report.results.get((op, H1, stack.name), []))
        if len(spent) > 1 and sum(spent) and max(spent) >= LOPSIDED * sum(spent):
            self.report.lopsided.add((op, H1, stack.name, index))
            self.report.meta[f"runs where one worker did {LOPSIDED:.0%}+ of the work"] = "; ".join(
                f"{name} {what} run {i + 1}" for what, _, name, i in sorted(self.report.lopsided)
            )
        return result

    def _protocols(self, stack: Stack) -> tuple[str, ...]:
        """The protocols a stack's refresh and logout runs use."""
        return (H1, H2) if stack.h2 else (H1,)

    def _wanted(self, stack: Stack) -> int:
        """Sessions a stack's runs use: ours' logout check, refresh seeds, logout slices."""
        check = self.plan.check_n if stack.name == OURS else 0
        per_round = sum(CHAIN_SEEDS[p] + self.plan.token_cap for p in self._protocols(stack))
        return check + self.plan.rounds * per_round

    def _top_up(self) -> None:
        """Mint more sessions on each stack whose pool is short of the plan."""
        for stack in self.main_stacks:
            missing = self._wanted(stack) - len(self.pools[stack.name])
            if missing <= 0:
                continue
            rate = max(MIN_LOGIN_RATE, _login_rate(self.report, stack.name))
            seconds = min(self.plan.mint_limit_s, missing / rate + 1)
            log(f"minting up to {missing} more sessions on {stack.name} ({seconds:.0f} s)")
            self._login_h1(stack, seconds)

    def _slice_pools(self) -> None:
        """Share each pool: ours' logout check, then refresh seeds, then logout slices."""
        for stack in self.main_stacks:
            pool = self.pools[stack.name]
            offset = min(self.plan.check_n, len(pool)) if stack.name == OURS else 0
            if offset:
                self.check_pairs = pool[:offset]
            for round_no in range(self.plan.rounds):
                for protocol in self._protocols(stack):
                    n = CHAIN_SEEDS[protocol]
                    self.seeds[(round_no, protocol, stack.name)] = pool[offset : offset + n]
                    offset += n
            runs = self.plan.rounds * len(self._protocols(stack))
            n = min(self.plan.token_cap, max(0, len(pool) - offset) // runs)
            for round_no in range(self.plan.rounds):
                for protocol in self._protocols(stack):
                    self.slices[(round_no, protocol, stack.name)] = pool[offset : offset + n]
                    offset += n
            self.report.meta[f"logout tokens/run {stack.name}"] = n

    # --- correctness and profile -------------------------------------------------------

    def _logout_check(self) -> None:
        """Logout, then GET with the same token on a new connection."""
        ours = self.main_stacks[0]
        pairs = self.check_pairs
        log(f"logout, then GET on a new connection: {len(pairs)} times")
        self.report.logout_check = checks.accepted_after_logout(ours.port, self.context, pairs)

    def _profile(self) -> None:
        """Sample our workers (wall, then GIL) under protected-GET load."""
        executable = spy.py_spy()
        if executable is None:
            self.report.notes.append("py-spy not found: .venv/bin/pip install py-spy")
            return
        ours, seconds = self.main_stacks[0], self.plan.profile_s
        pids = stacks.worker_pids(ours)
        log(f"py-spy on workers {pids}, 2 x {seconds} s under protected-GET load")
        url, token = f"{ours.url}/api/hello", self.tokens[ours.name].access
        load = drivers.wrk_start(url, "get.lua", [token], 2 * seconds + 3)
        time.sleep(1)
        RESULTS.mkdir(exist_ok=True)
        for old in RESULTS.glob("py-spy-*.txt"):
            old.unlink()
        wall = spy.summarize(spy.record(executable, pids, seconds, RESULTS))
        gil = spy.summarize(spy.record(executable, pids, seconds, RESULTS, gil=True))
        result = drivers.wrk_finish(load, 2 * seconds + 30)
        what = f"HTTP/1.1 wrk, {result.rps:,.0f} req/s while sampled, {len(pids)} workers"
        self.report.profile = {"what": what, "wall": wall, "gil": gil}


def _versions() -> str:
    """The servers' and parsers' versions: a reference's speed moves with them."""
    from service.transport.shapes import library_versions

    return library_versions(SERVER_PACKAGES).replace(", ", " / ")


def _service_has(setting: str) -> bool:
    """Whether the service's Settings has a field."""
    from service.config import Settings

    return setting in Settings.model_fields


def _login_rate(report: Report, name: str) -> float:
    """Logins per second seen so far on one stack (HTTP/1.1)."""
    runs = report.results.get((LOGIN, H1, name), [])
    seconds = sum(r.duration_s for r in runs)
    return sum(r.requests for r in runs) / seconds if seconds else 0.0


def _json_default(value: object) -> object:
    """JSON for dataclasses (results) and anything else as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def dump_json(report: Report, path: Path) -> None:
    """Raw numbers of the run beside the Markdown."""
    data = {
        "meta": report.meta,
        "results": {" | ".join(key): runs for key, runs in report.results.items()},
        "storm": report.storm,
        "memory": report.memory,
        "logout_check": report.logout_check,
        "side_by_side": {" | ".join(key): runs for key, runs in report.side_by_side.items()},
        "profile": report.profile,
        "lopsided": sorted(report.lopsided),
    }
    path.write_text(json.dumps(data, indent=1, default=_json_default))


if __name__ == "__main__":
    sys.exit(main())

"""Interleaved A/B of each change service/transport/ makes to library internals, on this build.

    .venv/bin/python bench/ab_changes.py [--pairs 5] [--seconds 3] [--only NAME ...]
                                         [--service-src DIR]

docs/performance.md keeps a change to a library's private internals only where it gains at
least 5% on a benchmark target: protected GET throughput over HTTP/1.1 (wrk) and HTTP/2
(h2load), and GET p99. For each speed-up LIBRARY_CHANGES names, the service (production
settings, TLS, 2 workers) runs with every change (A) beside itself with all but that one
(B); and A beside none at all. Both servers of a comparison are up, one database and Redis
prefix; only one is under load at a time. Each pair is two back-to-back runs of the same
protocol, A then B, and B then A in the next pair, so that the machine's drift cancels.
A pair's gain is A÷B in throughput and B÷A in p99 (above 1: the change helps).

Verdict per change, on the protocols whose code it changes: kept where the median gain of
a throughput target is at least 1.05, or where every pair shows a p99 gain and their median
is at least 1.05 (a few seconds' p99 swings by tens of percent from run to run); too noisy
to decide (kept) where a throughput target's median is below 1.05 but its pairs disagree in
sign; dropped where every pair of every throughput target agrees and the medians are below
1.05. Prints the report and writes it to bench/results/library_changes.md (and .json).
Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust), Redis on 127.0.0.1:6379, wrk and
h2load. Everything started is stopped, the database dropped and the keys deleted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import signal
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import backends
import client
import cpu
import drivers
import stacks
from drivers import Result
from report import H1, H2, PROTOCOLS, pooled
from stacks import Stack
from targets import pair_ratios

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
THRESHOLD = 1.05
WARM_UP_S = 1.0
ALL, NONE = "all", "none"
# The protocols whose code each change alters.
ACTS_ON = {
    "hpack_memo": (H2,),
    "h2_headers": (H2,),
    "coalesce": (H1, H2),
}


@dataclass
class Comparison:
    """A (every change) against B (all but one, or none): the runs of each, pair by pair."""

    name: str  # the change left out of B, or NONE
    setting: str  # B's LIBRARY_CHANGES
    runs: dict[tuple[str, str], list[Result]] = field(default_factory=dict)  # (A|B, protocol)
    others: float = 0.0  # share of the machine other processes took meanwhile

    def add(self, side: str, protocol: str, result: Result) -> None:
        """Record one run."""
        self.runs.setdefault((side, protocol), []).append(result)

    def gains(self, protocol: str, metric: str) -> list[float]:
        """Each pair's gain from the change(s): A÷B in throughput, B÷A in p99."""
        a, b = self.runs.get(("A", protocol), []), self.runs.get(("B", protocol), [])
        if metric == "rps":
            return pair_ratios(a, b, lambda x, y: x.rps / y.rps)
        return pair_ratios(a, b, lambda x, y: y.p99_ms / x.p99_ms if x.p99_ms else 0.0)


def main(argv: list[str] | None = None) -> int:
    """Run every comparison, print the report, write it under bench/results/."""
    args = _parser().parse_args(argv)
    missing = drivers.missing_tools()
    if missing:
        print(f"missing load generators; install: apt-get install -y {' '.join(missing)}")
        return 2
    source = args.service_src.resolve()
    sys.path.insert(0, str(source))
    from service.config import PERFORMANCE_CHANGES

    names = args.only or list(PERFORMANCE_CHANGES)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill, too
    comparisons = [Comparison(NONE, NONE)] + [
        Comparison(name, ",".join(other for other in PERFORMANCE_CHANGES if other != name))
        for name in names
    ]
    meta: dict[str, object] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "pairs": args.pairs,
        "seconds per run": args.seconds,
        "service": str(source),
    }
    with tempfile.TemporaryDirectory(prefix="authsvc-ab-") as tmp:
        meta["speed probe before"] = f"{cpu.probe_seconds():.2f} s"
        run_all(comparisons, args, source, Path(tmp))
        meta["speed probe after"] = f"{cpu.probe_seconds():.2f} s"
    text = render(comparisons, meta)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "library_changes.md").write_text(text)
    raw = {"meta": meta, "comparisons": [_raw(c) for c in comparisons]}
    (RESULTS / "library_changes.json").write_text(json.dumps(raw, indent=1))
    log(f"wrote {RESULTS / 'library_changes.md'}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=5, help="pairs per protocol (at least 3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one run")
    parser.add_argument("--only", action="append", help="these changes only (and all vs none)")
    parser.add_argument("--service-src", type=Path, default=BENCH_DIR.parent)
    return parser


def log(message: str) -> None:
    """Progress on stderr, so that stdout holds only the report."""
    print(f"[ab {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_all(
    comparisons: list[Comparison], args: argparse.Namespace, source: Path, workdir: Path
) -> None:
    """Start A once, then each B in turn beside it; stop everything whatever happens."""
    if args.pairs < 3:
        raise SystemExit("--pairs: at least 3")
    made = backends.create(workdir)
    context = client.tls_context(made.cert)
    a = _variant(made, source, ALL, {})
    try:
        stacks.migrate(a)
        with _running(a, workdir, context):
            client.register(a.port, context)
            token_a = _signed_in(a, context)
            for comparison in comparisons:
                # The same SECRET_KEY: it seals the OAuth signing keys both read.
                b = _variant(made, source, comparison.setting, {"SECRET_KEY": a.env["SECRET_KEY"]})
                with _running(b, workdir, context):
                    token_b = _signed_in(b, context)
                    log(f"{comparison.name}: A = {ALL}, B = LIBRARY_CHANGES={comparison.setting}")
                    measure(comparison, {"A": (a, token_a), "B": (b, token_b)}, args)
                    _check_logs(a, b)
    finally:
        deleted = backends.drop(made)
        log(f"dropped the database, deleted {deleted} keys")


def _variant(made: backends.Backends, source: Path, setting: str, extra: dict[str, str]) -> Stack:
    """Our service with LIBRARY_CHANGES=setting."""
    stack = stacks.ours(made, source, {"LIBRARY_CHANGES": setting, **extra})
    stack.name = f"ours-{setting.replace(',', '-')}"  # its log file's name
    stack.label = f"LIBRARY_CHANGES={setting}"
    return stack


@contextmanager
def _running(stack: Stack, workdir: Path, context: ssl.SSLContext) -> Iterator[Stack]:
    """The stack started and ready; stopped (its whole process group) afterwards."""
    stacks.start(stack, workdir)
    try:
        stacks.wait_ready(stack, context)
        yield stack
    finally:
        stacks.stop(stack)


def _signed_in(stack: Stack, context: ssl.SSLContext) -> str:
    """An access token of the bench user on this stack, checked to work."""
    pair = client.login(stack.port, context)
    client.smoke(stack.port, context, pair)
    return pair.access


def _check_logs(*servers: Stack) -> None:
    """A server that left a change out (its libraries differ) measures something else."""
    for stack in servers:
        text = stack.log_path.read_text(errors="replace") if stack.log_path else ""
        if "NOT applied" in text or "Traceback" in text:
            raise RuntimeError(f"{stack.label}: see its log\n{stacks.log_tail(stack)}")


RUNNERS: dict[str, Callable[[Stack, str, float], Result]] = {
    H1: lambda stack, token, seconds: drivers.get_h1(stack.url, token, seconds),
    H2: lambda stack, token, seconds: drivers.get_h2(stack.url, token, seconds),
}


def measure(
    comparison: Comparison, sides: dict[str, tuple[Stack, str]], args: argparse.Namespace
) -> None:
    """Warm both up, then the pairs: A B, B A, ... for each protocol in turn."""
    for stack, token in sides.values():
        for run in RUNNERS.values():
            run(stack, token, WARM_UP_S)
    groups = {stack.process.pid for stack, _ in sides.values() if stack.process}
    before = cpu.snapshot(groups)
    for number in range(args.pairs):
        order = ["A", "B"] if number % 2 == 0 else ["B", "A"]
        for protocol in PROTOCOLS:
            for side in order:
                stack, token = sides[side]
                comparison.add(side, protocol, RUNNERS[protocol](stack, token, args.seconds))
    comparison.others = cpu.shares(before, cpu.snapshot(groups))["others"]


@dataclass(frozen=True)
class Judged:
    """One target of one comparison: the median gain, each pair's, and what they say."""

    median: float
    pairs: list[float]
    verdict: str  # "gain" (median at least THRESHOLD), "noisy" (signs differ), "small"


def judge(gains: list[float]) -> Judged:
    """The median of the pairs against THRESHOLD; whether the pairs agree in sign."""
    median = statistics.median(gains) if gains else 0.0
    if median >= THRESHOLD:
        verdict = "gain"
    elif gains and min(gains) < 1 < max(gains):
        verdict = "noisy"
    else:
        verdict = "small"
    return Judged(median, gains, verdict)


def decide(comparison: Comparison) -> tuple[str, str]:
    """Keep, drop, or too noisy to decide (kept), and why, from the protocols it acts on."""
    reasons, noisy = [], []
    for protocol in ACTS_ON.get(comparison.name, PROTOCOLS):
        rps = judge(comparison.gains(protocol, "rps"))
        p99 = judge(comparison.gains(protocol, "p99"))
        if rps.verdict == "gain":
            reasons.append(f"{protocol} throughput {rps.median:.3f}x")
        if p99.verdict == "gain" and min(p99.pairs) > 1:
            reasons.append(f"{protocol} p99 {p99.median:.3f}x in every pair")
        if rps.verdict == "noisy":
            noisy.append(f"{protocol} throughput {rps.median:.3f}x, pairs of both signs")
    if reasons:
        return "keep", "; ".join(reasons)
    if noisy:
        return "too noisy to decide: keep", "; ".join(noisy)
    return "drop", "throughput under 5%, every pair of the same sign, no p99 gain in every pair"


def render(comparisons: list[Comparison], meta: dict[str, object]) -> str:
    """The report: the pairs' gains per comparison and protocol, then the verdicts."""
    lines = [
        "# Library changes: interleaved A/B on the current build",
        "",
        ", ".join(f"{key}: {value}" for key, value in meta.items()),
        "",
        "A = every change (LIBRARY_CHANGES=all); B = all but the one named (or none). Gain: "
        "A÷B in throughput, B÷A in p99 (above 1: the change helps); the median of the pairs, "
        "then each pair. req/s: requests over seconds of all runs; p99: median of the runs'.",
        "",
        "| change | protocol | A req/s | B req/s | gain (median; pairs) | A p99 ms | B p99 ms "
        "| p99 gain (median; pairs) | others' CPU |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | --- | ---: |",
    ]
    for comparison in comparisons:
        for protocol in PROTOCOLS:
            a = comparison.runs.get(("A", protocol))
            b = comparison.runs.get(("B", protocol))
            if not a or not b:
                continue
            rps = judge(comparison.gains(protocol, "rps"))
            p99 = judge(comparison.gains(protocol, "p99"))
            lines.append(
                f"| {comparison.name} | {protocol} | {pooled(a).rps:,.0f} | {pooled(b).rps:,.0f} "
                f"| {_gains(rps)} | {pooled(a).p99:.1f} | {pooled(b).p99:.1f} | {_gains(p99)} "
                f"| {comparison.others:.0%} |"
            )
    lines += ["", "| change | acts on | verdict | why |", "| --- | --- | --- | --- |"]
    for comparison in comparisons:
        if comparison.name == NONE:
            continue
        verdict, why = decide(comparison)
        acts = ", ".join(ACTS_ON.get(comparison.name, PROTOCOLS))
        lines.append(f"| {comparison.name} | {acts} | {verdict} | {why} |")
    lines += [
        "",
        "The machine has 2 cores shared with other work, and the load generators share them "
        "with the servers: compare within a row. 'others' CPU' is the share of the machine "
        "other processes took during that comparison; the speed probe (a fixed loop on one "
        "core, best of three) slower after than before means the host itself slowed down. "
        "A change's rows for a protocol it does not act on measure nothing but this run's "
        "noise: a median that far from 1 can be noise on the other rows too.",
    ]
    return "\n".join(lines) + "\n"


def _gains(judged: Judged) -> str:
    """A median gain and each pair's, as shown in the report."""
    pairs = ", ".join(f"{gain:.2f}" for gain in judged.pairs)
    return f"**{judged.median:.3f}x**; {pairs}"


def _raw(comparison: Comparison) -> dict[str, object]:
    """One comparison's runs for the JSON file."""
    return {
        "name": comparison.name,
        "setting": comparison.setting,
        "others": comparison.others,
        "runs": {
            f"{side} {protocol}": [dataclasses.asdict(r) for r in runs]
            for (side, protocol), runs in comparison.runs.items()
        },
    }


if __name__ == "__main__":
    sys.exit(main())

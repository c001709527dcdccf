"""The service's targets, checked against one run.

A throughput ratio is judged on the median of its pairs: the two runs compared went
back to back (GET runs alternate stack order pass by pass), so a pair shares the
machine's state, and the median shrugs off a pass the machine swung through. The
pooled ratio (requests over seconds, whole run) is shown beside it.

A write-path pair in which either server's run was lopsided (one worker did nearly all
the work while the other core idled) is shown but not judged: it compares one server's
mode, not the two servers. With no other pair, the target is left undecided.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Collection

from drivers import Result
from report import (
    CLIENT_CREDENTIALS,
    GET,
    H1,
    H2,
    LOGOUT,
    NO_CHECK,
    OURS,
    REFRESH,
    Report,
    pooled,
)

REF_A, REF_B = "flask", "fastapi"
MEMORY_LIMIT_B = 100
MEMORY_COUNT = 100_000
CHECK_LIMIT = 0.10
STORM_LIMIT = 2.0

Row = tuple[str, str, str, str, bool | None]  # target, wanted, judged, also shown, met


def render(report: Report) -> str:
    """A table of every target: what was wanted, what this run measured, met or not."""
    rows = [
        _ratio(report, "GET, HTTP/1.1: ours ÷ ref a", (GET, H1, OURS), (GET, H1, REF_A), 1.2),
        _ratio(report, "GET, HTTP/1.1: ours ÷ ref b", (GET, H1, OURS), (GET, H1, REF_B), 1.0),
        _p99(report),
        _ratio(
            report, "GET: ours over HTTP/2 ÷ over HTTP/1.1", (GET, H2, OURS), (GET, H1, OURS), 1
        ),
        _check_cost(report, H1),
        _check_cost(report, H2),
        _cost_shown(report, H1, side_by_side=True),
        _cost_shown(report, H2, side_by_side=True),
        _cost_shown(report, H1, side_by_side=False),
        _cost_shown(report, H2, side_by_side=False),
        _accepted(report),
        _memory(report),
        _storm(report),
        *_write_paths(report),
    ]
    lines = [
        "## Targets, from this run",
        "",
        "Throughput ratios: the median of pairs of back-to-back runs, judged; the pooled "
        "ratio and each pair beside it. Write-path pairs with a lopsided run (one worker did "
        "nearly all the work) are shown, not judged.",
        "",
        "| target | wanted | this run | pooled; each pair | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for target, wanted, judged, shown, met in (row for row in rows if row is not None):
        verdict = "—" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {target} | {wanted} | {judged} | {shown} | {verdict} |")
    return "\n".join(lines)


def _write_paths(report: Report) -> list[Row | None]:
    """Refresh, logout and client_credentials against ref a: judged over HTTP/1.1.

    Over HTTP/2 ref a's runs are shown beside ours, not judged: gunicorn's HTTP/2 is a
    different server from the one the HTTP/1.1 target compares with.
    """
    rows: list[Row | None] = []
    for op, name in (
        (REFRESH, "refresh"),
        (LOGOUT, "logout"),
        (CLIENT_CREDENTIALS, "client_credentials"),
    ):
        rows.append(
            _ratio(
                report,
                f"{name}, HTTP/1.1: ours ÷ ref a",
                (op, H1, OURS),
                (op, H1, REF_A),
                1.0,
                set_aside=report.lopsided,
            )
        )
        shown = _ratio(
            report, f"{name}, HTTP/2: ours ÷ ref a", (op, H2, OURS), (op, H2, REF_A), 1.0
        )
        rows.append(None if shown is None else (shown[0], "(shown)", *shown[2:4], None))
    return rows


def _runs(report: Report, key: tuple[str, str, str]) -> list[Result]:
    return report.results.get(key, [])


def pair_ratios(
    mine: list[Result], theirs: list[Result], ratio: Callable[[Result, Result], float]
) -> list[float]:
    """The ratio within each pair (each list holds one run per pass, in order)."""
    return [ratio(a, b) for a, b in zip(mine, theirs, strict=False) if a.rps and b.rps]


def _ratio(
    report: Report,
    target: str,
    mine: tuple[str, str, str],
    theirs: tuple[str, str, str],
    wanted: float,
    set_aside: Collection[tuple[str, str, str, int]] = (),
) -> Row | None:
    """Judge the median of the pairs, leaving out those with a run in set_aside."""
    a, b = _runs(report, mine), _runs(report, theirs)
    pairs = [
        (x.rps / y.rps, (*mine, i) in set_aside or (*theirs, i) in set_aside)
        for i, (x, y) in enumerate(zip(a, b, strict=False))
        if x.rps and y.rps
    ]
    if not pairs:
        return None
    shown = f"{pooled(a).rps / pooled(b).rps:.2f}x; " + ", ".join(
        f"{ratio:.2f}" + (" (lopsided)" if aside else "") for ratio, aside in pairs
    )
    judged = [ratio for ratio, aside in pairs if not aside]
    wants = f"at least {wanted:.1f}x"
    if not judged:
        return target, wants, "undecided: every pair lopsided", shown, None
    median = statistics.median(judged)
    return target, wants, f"{median:.2f}x", shown, median >= wanted


def _p99(report: Report) -> Row | None:
    ours = _runs(report, (GET, H1, OURS))
    refs = [_runs(report, (GET, H1, ref)) for ref in (REF_A, REF_B)]
    if not ours or not all(refs):
        return None
    mine, theirs = pooled(ours).p99, [pooled(runs).p99 for runs in refs]
    judged = f"{mine:.1f} ms vs {theirs[0]:.1f} / {theirs[1]:.1f}"
    shown = "median of the runs' p99; ours each run: " + ", ".join(
        f"{run.p99_ms:.0f}" for run in ours
    )
    target = "GET p99, HTTP/1.1: ours vs refs a / b"
    return target, "no worse than either", judged, shown, mine <= min(theirs)


def _check_cost(report: Report, protocol: str) -> Row | None:
    """The check's cost, judged on every pair of both measurements below.

    Neither is tighter than the other on this machine (the side-by-side pairs scatter as
    widely as the passes'), and a median of all of them swings less than one of five.
    """
    ours, without = _check_runs(report, protocol, False)
    side_ours, side_without = _check_runs(report, protocol, True)
    passes = pair_ratios(ours, without, _cost_of)
    side = pair_ratios(side_ours, side_without, _cost_of)
    if not passes and not side:
        return None
    median = statistics.median(passes + side)
    shown = f"median of all {len(passes) + len(side)} pairs below"
    shown += f" ({len(side)} side by side, {len(passes)} from the passes)"
    target = f"revocation check's cost, GET over {protocol}"
    return target, f"at most {CHECK_LIMIT:.0%}", f"{median:.0%}", shown, median <= CHECK_LIMIT


def _check_runs(
    report: Report, protocol: str, side_by_side: bool
) -> tuple[list[Result], list[Result]]:
    """Ours' and its twin's GET runs: from the passes, or from the side-by-side runs."""
    if side_by_side:
        runs = report.side_by_side
        return runs.get((protocol, OURS), []), runs.get((protocol, NO_CHECK), [])
    return _runs(report, (GET, protocol, OURS)), _runs(report, (GET, protocol, NO_CHECK))


def _cost_of(ours: Result, without: Result) -> float:
    return 1 - ours.rps / without.rps


def _cost_shown(report: Report, protocol: str, *, side_by_side: bool) -> Row | None:
    """One of the two measurements the judged cost pools, shown on its own.

    Loaded at once, both twins see the same machine; in the GET passes (one after the
    other), the machine's drift between a pair's two runs stays in.
    """
    cost = _cost(*_check_runs(report, protocol, side_by_side))
    if cost is None:
        return None
    median, shown = cost
    what = "both loaded at once" if side_by_side else "the GET passes (one after the other)"
    return f"of which: {what}, {protocol}", "(shown)", f"{median:.0%}", shown, None


def _cost(ours: list[Result], without: list[Result]) -> tuple[float, str] | None:
    """The check's cost: the median of the pairs, and the pooled cost and each pair."""
    costs = pair_ratios(ours, without, _cost_of)
    if not costs:
        return None
    pooled_cost = 1 - pooled(ours).rps / pooled(without).rps
    shown = f"{pooled_cost:.0%}; " + ", ".join(f"{cost:.0%}" for cost in costs)
    return statistics.median(costs), shown


def _accepted(report: Report) -> Row | None:
    check = report.logout_check
    if not check:
        return None
    judged = f"{check['accepted']} of {check['logouts_204']}"
    shown = f"{check['cross_worker']} of the pairs had logout and GET on different workers"
    met = check["accepted"] == 0 and check["logouts_204"] > 0
    return "revoked tokens accepted after their logout answered", "0", judged, shown, met


def _memory(report: Report) -> Row | None:
    ours = {
        name: data
        for name, data in report.memory.items()
        if "keys" in data and name.startswith(OURS)
    }
    if not ours:
        return None
    worst = max(data["used_memory_per_entry"] for data in ours.values())
    count = max(data["count"] for data in ours.values())
    shown = "; ".join(f"{name}: {data['used_memory_per_entry']:.0f}" for name, data in ours.items())
    target = f"Redis bytes per revoked token, {count:,.0f} revocations (worst layout)"
    # Per-key overhead weighs more on fewer entries: --quick's 10,000 are not the target's.
    met = worst <= MEMORY_LIMIT_B if count >= MEMORY_COUNT else None
    return target, f"at most {MEMORY_LIMIT_B} over {MEMORY_COUNT:,}", f"{worst:.0f}", shown, met


def _storm(report: Report) -> Row | None:
    runs = report.storm.get(OURS)
    if not runs:
        return None
    pairs = zip(runs["alone"], runs["during"], strict=True)
    ratios = [during.p99_ms / alone.p99_ms for alone, during in pairs if alone.p99_ms]
    if not ratios:
        return None
    median = statistics.median(ratios)
    shown = "each round: " + ", ".join(f"{ratio:.2f}" for ratio in ratios)
    target = "GET p99 during a login storm ÷ without"
    return target, f"at most {STORM_LIMIT:.0f}x", f"{median:.2f}x", shown, median <= STORM_LIMIT

"""Turn the measurements of one run into a Markdown report."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from drivers import Result

GET, LOGIN = "GET /api/hello", "POST /auth/login"
CLIENT_CREDENTIALS = "POST /oauth/token (client_credentials)"
REFRESH, LOGOUT = "POST /auth/refresh", "POST /auth/logout"
OPS = (GET, LOGIN, CLIENT_CREDENTIALS, REFRESH, LOGOUT)
H1, H2 = "HTTP/1.1", "HTTP/2"
PROTOCOLS = (H1, H2)
OURS, NO_CHECK = "ours", "ours-nocheck"  # stack names


@dataclass
class Report:
    """Everything one run measured."""

    meta: dict[str, object]
    labels: dict[str, str]
    partial: set[str] = field(default_factory=set)  # stacks measured on GET only
    results: dict[tuple[str, str, str], list[Result]] = field(default_factory=dict)
    storm: dict[str, dict[str, list[Result]]] = field(default_factory=dict)
    side_by_side: dict[tuple[str, str], list[Result]] = field(default_factory=dict)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    logout_check: dict[str, int] = field(default_factory=dict)
    profile: dict[str, object] | None = None
    notes: list[str] = field(default_factory=list)
    # Runs (op, protocol, stack, index) in which one worker did nearly all the work.
    lopsided: set[tuple[str, str, str, int]] = field(default_factory=set)

    def add(self, op: str, protocol: str, stack: str, result: Result) -> None:
        """Record one run."""
        self.results.setdefault((op, protocol, stack), []).append(result)


@dataclass(frozen=True)
class Row:
    """Runs of one op x protocol x stack, pooled."""

    rps: float
    p50: float
    p99: float
    runs: int
    requests: int
    bad: int


def pooled(runs: list[Result]) -> Row:
    """Requests over total time; median of the runs' p50 and p99."""
    seconds = sum(r.duration_s for r in runs)
    requests = sum(r.requests for r in runs)
    return Row(
        rps=requests / seconds if seconds else 0.0,
        p50=statistics.median(r.p50_ms for r in runs),
        p99=statistics.median(r.p99_ms for r in runs),
        runs=len(runs),
        requests=requests,
        bad=sum(r.non2xx + r.errors for r in runs),
    )


def render(report: Report, summary: str = "") -> str:
    """The whole report; summary (the targets) goes right after the header."""
    parts = [_header(report), summary, _main_table(report), _storm(report), _memory(report)]
    parts += [_logout_check(report), _profile(report), _notes(report)]
    return "\n\n".join(part for part in parts if part) + "\n"


def _header(report: Report) -> str:
    """Title and run metadata."""
    meta = ", ".join(f"{key}: {value}" for key, value in report.meta.items())
    return f"# Benchmark: our service vs reference stacks\n\n{meta}"


def _main_table(report: Report) -> str:
    """The op x protocol x stack table."""
    lines = [
        "## Throughput and latency (TLS; HTTP/1.1 = wrk, HTTP/2 = h2load or h2post)",
        "",
        "| op | protocol | stack | req/s | p50 ms | p99 ms | runs (requests) | non-2xx+err "
        "| ours ÷ this |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for op in OPS:
        for protocol in PROTOCOLS:
            lines += _rows(report, op, protocol)
    return "\n".join(lines)


def _rows(report: Report, op: str, protocol: str) -> list[str]:
    """Rows of one op and protocol, with ratios to ours."""
    ours = report.results.get((op, protocol, OURS))
    ours_rps = pooled(ours).rps if ours else None
    lines = []
    for stack, label in report.labels.items():
        runs = report.results.get((op, protocol, stack))
        if not runs:
            if stack not in report.partial and (op, protocol, OURS) in report.results:
                lines.append(f"| {op} | {protocol} | {label} | n/a | | | | | |")
            continue
        row = pooled(runs)
        ratio = "—" if stack == OURS or not ours_rps else f"{ours_rps / row.rps:.2f}x"
        lines.append(
            f"| {op} | {protocol} | {label} | {row.rps:,.0f} | {row.p50:.1f} | {row.p99:.1f} "
            f"| {row.runs} ({row.requests:,}) | {row.bad} | {ratio} |"
        )
    return lines


def _storm(report: Report) -> str:
    """Protected GET alone vs during a login storm: pooled runs, and the p99 ratio per round."""
    if not report.storm:
        return ""
    lines = [
        "## Protected GET (HTTP/1.1) alone vs during a login storm",
        "",
        "| stack | GET req/s alone | p99 ms alone | GET req/s in storm | p99 ms in storm "
        "| p99 in storm / alone: median (each round) | logins/s in storm (non-2xx) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for stack, runs in report.storm.items():
        pairs = zip(runs["alone"], runs["during"], strict=True)
        ratios = [during.p99_ms / alone.p99_ms for alone, during in pairs if alone.p99_ms]
        each = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        median = f"{statistics.median(ratios):.2f}x ({each})" if ratios else "n/a"
        alone, during, login = (pooled(runs[kind]) for kind in ("alone", "during", "login"))
        lines.append(
            f"| {report.labels[stack]} | {alone.rps:,.0f} | {alone.p99:.1f} "
            f"| {during.rps:,.0f} | {during.p99:.1f} | {median} | {login.rps:,.0f} ({login.bad}) |"
        )
    return "\n".join(lines)


def _memory(report: Report) -> str:
    """Revocation memory per entry, and after expiry."""
    if not report.memory:
        return ""
    lines = [
        "## Redis memory per revocation (RedisBlocklist.add, production shards/buckets)",
        "",
        "| layout | revocations | keys | used_memory B/entry | MEMORY USAGE B/entry |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, data in report.memory.items():
        if "keys" in data:
            lines.append(
                f"| {name} | {data['count']:,.0f} | {data['keys']:,.0f} "
                f"| {data['used_memory_per_entry']:.0f} | {data['memory_usage_per_entry']:.0f} |"
            )
    expiry = report.memory.get("expiry")
    if expiry:
        lines += [
            "",
            f"Expiry: {expiry['count']:,.0f} revocations expiring within seconds took "
            f"{expiry['loaded_per_entry']:.0f} B/entry while loaded; "
            f"{expiry['expiry_wait_s']:.1f} s after they expired {expiry['keys_left']:.0f} keys "
            f"were left and used_memory was {expiry['after_expiry_bytes']:+,.0f} B "
            "from before (shared Redis: other clients move this too).",
        ]
    return "\n".join(lines)


def _logout_check(report: Report) -> str:
    """Revoked tokens accepted after their logout."""
    check = report.logout_check
    if not check:
        return ""
    return (
        "## Revoked tokens accepted after logout answered (ours)\n\n"
        f"{check['accepted']} accepted of {check['logouts_204']} logouts answered 204 "
        f"({check['logouts']} tried); GET on a new connection: {check['refused_401']} refused "
        f"with 401, {check['other']} other; {check['cross_worker']} of the pairs had logout "
        "and GET on different workers."
    )


def _profile(report: Report) -> str:
    """py-spy summary: categories and top functions."""
    profile = report.profile
    if not profile:
        return ""
    wall, gil = profile["wall"], profile["gil"]
    lines = [
        f"## py-spy profile of our workers, protected GET ({profile['what']})",
        "",
        f"wall = active threads, waits included ({wall['samples']:,} samples); "
        f"GIL = the thread running Python ({gil['samples']:,} samples).",
        "",
        "| where (first match on the stack) | wall | GIL |",
        "| --- | ---: | ---: |",
    ]
    for label, share in wall["categories"].items():
        lines.append(f"| {label} | {share:.1%} | {gil['categories'].get(label, 0.0):.1%} |")
    lines += ["", "| own time (wall) | function | own time (GIL) | function |"]
    lines.append("| ---: | --- | ---: | --- |")
    for i in range(max(len(wall["own"]), len(gil["own"]))):
        cells = [_own_cell(wall["own"], i), _own_cell(gil["own"], i)]
        lines.append(f"| {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _own_cell(own: list[tuple[str, float]], i: int) -> str:
    """Two table cells for the i-th function, or blanks."""
    if i >= len(own):
        return " | "
    name, share = own[i]
    return f"{share:.1%} | `{name}`"


def _notes(report: Report) -> str:
    """Method notes."""
    if not report.notes:
        return ""
    return "## Notes\n\n" + "\n".join(f"- {note}" for note in report.notes)

"""Who used the CPU during the run: this benchmark, the shared databases, or someone else.

The machine may be shared; a run is only as good as the share of the cores it had.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

INFRA = {"redis-server", "postgres"}  # serve this run, but also anyone else


@dataclass(frozen=True)
class Snapshot:
    """Cumulative CPU ticks: whole machine, this run's process groups, Redis + PostgreSQL."""

    total: int
    busy: int
    ours: int
    infra: int


def _proc_stat(pid_dir: Path) -> tuple[str, int, int, int] | None:
    """(command, process group, own ticks, reaped children's ticks) of one process."""
    try:
        text = (pid_dir / "stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    own = int(fields[11]) + int(fields[12])
    children = int(fields[13]) + int(fields[14])
    return comm, int(fields[2]), own, children


def snapshot(groups: set[int]) -> Snapshot:
    """Read the counters now; groups are the process groups this run started."""
    cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total, idle = sum(cpu), cpu[3] + cpu[4]
    ours = infra = 0
    me = os.getpgrp()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        stat = _proc_stat(pid_dir)
        if stat is None:
            continue
        comm, pgid, own, children = stat
        if pgid == me or pgid in groups:
            ours += own + (children if int(pid_dir.name) == os.getpid() else 0)
        elif comm in INFRA:
            infra += own
    return Snapshot(total, total - idle, ours, infra)


def shares(start: Snapshot, end: Snapshot) -> dict[str, float]:
    """Shares of the machine's CPU time between two snapshots."""
    total = max(1, end.total - start.total)
    ours = (end.ours - start.ours) / total
    infra = (end.infra - start.infra) / total
    busy = (end.busy - start.busy) / total
    return {"this run": ours, "redis+postgres": infra, "others": max(0.0, busy - ours - infra)}


PROBE_LOOPS = 5_000_000


def probe_seconds() -> float:
    """Seconds one core takes for a fixed loop now, at best of three.

    Contention from outside this machine (other tenants of the host) shows in no process
    list; a slower probe at the end of a run than at its start is how it shows here.
    """
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(PROBE_LOOPS):
            total += i
        best = min(best, time.perf_counter() - start)
    return best


def worker_ticks(pids: Iterable[int]) -> dict[int, int]:
    """CPU ticks each of these processes has used so far (those still there)."""
    ticks = {}
    for pid in pids:
        stat = _proc_stat(Path(f"/proc/{pid}"))
        if stat is not None:
            ticks[pid] = stat[2]
    return ticks

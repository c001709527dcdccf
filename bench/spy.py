"""Sample server workers with py-spy while they are under load, and summarise the stacks."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

RATE = 200
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")
LIBRARY_PREFIX = re.compile(r"^.*?(site-packages/|/lib/python3\.\d+/)")
REPO_PREFIX = str(Path(__file__).resolve().parent.parent) + "/"
# A sample counts for the first category whose marker appears anywhere on its stack.
CATEGORIES = [
    ("Redis: revocation checks, writes and the feed (redis-py)", "(redis/"),
    ("Revocation check: kept verdicts", "(service/store/revocation_feed.py)"),
    ("JWT decode and verify (PyJWT)", "(jwt/"),
    ("JWT decode and verify (PyJWT)", "(service/auth/verified.py)"),
    ("HTTP/2 framing and HPACK (h2, hpack)", "(h2/"),
    ("HTTP/2 framing and HPACK (h2, hpack)", "(hpack/"),
    ("Flask dispatch, rest of the view", "Flask.wsgi_app"),
    ("ASGI adapter (environ, response)", "(service/adapter.py)"),
    ("Hypercorn: HTTP parsing, TLS, event loop", "(hypercorn/"),
]


def py_spy() -> str | None:
    """The py-spy executable (venv first), or None."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(
    executable: str, pids: list[int], seconds: int, outdir: Path, *, gil: bool = False
) -> list[Path]:
    """Record collapsed stacks of every pid for seconds (non-blocking sampling).

    By default every thread that is not idle is sampled (wall time, waits included);
    with gil=True only the thread holding the GIL (Python CPU time).
    """
    outputs, processes = [], []
    for pid in pids:
        out = outdir / f"py-spy-{'gil' if gil else 'wall'}-{pid}.txt"
        command = [executable, "record", "-p", str(pid), "-d", str(seconds), "-r", str(RATE)]
        command += ["-f", "raw", "-o", str(out), "--nonblocking"] + (["--gil"] if gil else [])
        processes.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        )
        outputs.append(out)
    for process in processes:
        process.communicate(timeout=seconds + 30)
    return [out for out in outputs if out.exists()]


def _frames(line: str) -> tuple[list[str], int]:
    """Frames (function and short file) and count of one collapsed line."""
    stack, _, count = line.rpartition(" ")
    frames = []
    for frame in stack.split(";"):
        match = FRAME.match(frame.strip())
        if match:
            frames.append(f"{match['func']} ({_short(match['file'])})")
    return frames, int(count)


def _short(path: str) -> str:
    """Path relative to site-packages, the standard library or the repository."""
    return LIBRARY_PREFIX.sub("", path).removeprefix(REPO_PREFIX)


def _stacks(paths: list[Path]) -> Iterator[tuple[list[str], int]]:
    """Every (frames, count) in the recordings."""
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip() and line[-1].isdigit():
                frames, count = _frames(line)
                if frames:
                    yield frames, count


def _category(frames: list[str]) -> str:
    """The first category whose marker is on the stack."""
    joined = ";".join(frames)
    return next((label for label, marker in CATEGORIES if marker in joined), "other")


def summarize(paths: list[Path], top: int = 12) -> dict[str, object]:
    """Samples by category of work, and the top functions by own samples."""
    samples, own, _, categories = _tally(paths)
    share = 1 / samples if samples else 0.0
    return {
        "samples": samples,
        "categories": {label: categories[label] * share for label, _ in CATEGORIES}
        | {"other": categories["other"] * share},
        "own": [(name, n * share) for name, n in own.most_common(top)],
    }


def by_function(
    paths: list[Path], top: int
) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """Samples, and the top functions by share of samples: on the stack, and at its top."""
    samples, own, inclusive, _ = _tally(paths)
    share = 1 / samples if samples else 0.0
    return (
        samples,
        [(name, n * share) for name, n in inclusive.most_common(top)],
        [(name, n * share) for name, n in own.most_common(top)],
    )


def _tally(paths: list[Path]) -> tuple[int, Counter[str], Counter[str], Counter[str]]:
    """Samples, and their counts by function at the top, by function anywhere, by category."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    samples = 0
    for frames, count in _stacks(paths):
        samples += count
        own[frames[-1]] += count
        categories[_category(frames)] += count
        for frame in set(frames):
            inclusive[frame] += count
    return samples, own, inclusive, categories

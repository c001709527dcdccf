"""Reading what a running server exposes: its metrics, its JSON log lines, a command's output."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import FLUSH_SECONDS
from tests.servers import ROOT, RunningServer


def scrape(
    url: str, *, settle: bool = True, **headers: str
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a metrics page, by name and labels.

    Workers hand their counts over once every FLUSH_SECONDS: settle waits until all that
    was counted before the call is in.
    """
    if settle:
        time.sleep(2 * FLUSH_SECONDS)
    response = httpx.get(url, headers=headers, timeout=10, verify=False)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """One sample's value; 0 when the page has no such series."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def log_lines(text: str, *, only_logs: bool = True) -> list[dict[str, Any]]:
    """Every line of a JSON log, parsed (each must be one JSON object).

    A command's standard error also has lines it prints for its user: only_logs=False
    skips those.
    """
    lines = []
    for line in text.splitlines():
        if line.strip() and (only_logs or line.startswith("{")):
            parsed = json.loads(line)
            assert isinstance(parsed, dict), line
            lines.append(parsed)
    return lines


def audit_lines(text: str, event: str) -> list[dict[str, Any]]:
    """The audit lines of one event (in a server's log, or a command's standard error)."""
    return [line for line in log_lines(text, only_logs=False) if line.get("event") == event]


def command(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m service ARGS` against the server's database, as an operator would."""
    done = subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done

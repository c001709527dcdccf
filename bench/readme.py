"""Put the latest full run's report into README.md, between its two bench markers."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- bench:latest -->", "<!-- /bench:latest -->"


def publish(report: str, readme: Path = README) -> None:
    """Replace what stands between the markers with report (a markdown section)."""
    text = readme.read_text()
    head, found, rest = text.partition(START)
    _, closed, tail = rest.partition(END)
    if not (found and closed):
        raise SystemExit(f"{readme} has no {START} ... {END} block to fill")
    readme.write_text(f"{head}{START}\n{report.strip()}\n{END}{tail}")

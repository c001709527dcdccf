"""Format the Date response header once per second instead of once per response.

Hypercorn formats the current time for every response (`wsgiref`'s format_date_time, about
1.3% of a protected GET's CPU). The header has one-second resolution, so the string made
for a second serves every response within it.
"""

from __future__ import annotations

from wsgiref.handlers import format_date_time

import hypercorn.config

_last: tuple[int, str] = (-1, "")


def cached_format_date_time(timestamp: float) -> str:
    """format_date_time, reusing the string of the same whole second."""
    global _last
    second = int(timestamp)
    last = _last
    if last[0] != second:
        last = _last = (second, format_date_time(second))
    return last[1]


def install() -> None:
    """Make Hypercorn's response headers use the cached date (idempotent; per process)."""
    hypercorn.config.format_date_time = cached_format_date_time  # type: ignore[attr-defined,assignment]

"""Format the Date response header once per second instead of once per response.

Hypercorn formats the current time for every response (`wsgiref`'s format_date_time, about
1.3% of a protected GET's CPU). The header has one-second resolution, so the string made
for a second serves every response within it.
"""

from __future__ import annotations

from wsgiref.handlers import format_date_time

import hypercorn.config

from service.transport.shapes import Shape, differing

_last: tuple[int, str] = (-1, "")


def cached_format_date_time(timestamp: float) -> str:
    """format_date_time, reusing the string of the same whole second."""
    global _last
    second = int(timestamp)
    last = _last
    if last[0] != second:
        last = _last = (second, format_date_time(second))
    return last[1]


SHAPES = [
    Shape(
        "Config.response_headers",
        hypercorn.config.Config.response_headers,
        ["self", "protocol"],
        {"format_date_time", "time"},
    ),
]


def shapes_differ() -> list[str]:
    """What of Hypercorn's internals this change relies on is not as it expects."""
    names = {"hypercorn.config.format_date_time": hasattr(hypercorn.config, "format_date_time")}
    return differing(SHAPES, names)


def install() -> None:
    """Make Hypercorn's response headers use the cached date (idempotent; per process)."""
    hypercorn.config.format_date_time = cached_format_date_time  # type: ignore[attr-defined,assignment]

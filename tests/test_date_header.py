"""The Date header made once per second reads exactly as Hypercorn's own."""

from __future__ import annotations

import time
from wsgiref.handlers import format_date_time

import pytest
from hypercorn.config import Config

from service.transport import date_header


def test_each_second_has_its_own_date() -> None:
    start = 1_764_612_000.0
    for offset in [0.0, 0.25, 0.999, 1.0, 1.5, 59.999, 60.0, 86_400.2, 0.5]:
        moment = start + offset
        assert date_header.cached_format_date_time(moment) == format_date_time(moment)


@pytest.mark.library_change("date_header")
def test_hypercorn_responses_carry_the_current_date() -> None:
    date_header.install()
    before = time.time()
    headers = dict(Config().response_headers("h2"))
    after = time.time()
    assert headers[b"date"].decode() in {format_date_time(before), format_date_time(after)}

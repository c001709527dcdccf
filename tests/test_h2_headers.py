"""The HTTP/2 header memos accept, refuse and rewrite exactly as h2 does."""

from __future__ import annotations

from typing import Any

import h2.stream
import pytest
from h2.exceptions import ProtocolError
from h2.utilities import (
    HeaderValidationFlags,
    normalize_outbound_headers,
    validate_headers,
    validate_outbound_headers,
)
from hpack import HeaderTuple, NeverIndexedHeaderTuple

from service.transport import h2_headers
from tests.h2_raw import CLOSED, exchange, serving, status

REQUEST = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
RESPONSE = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=True, is_push_promise=False
)
TOKEN = b"Bearer " + b"eyJ0eXAiOiJKV1QifQ" * 20
GOOD = [
    (b":method", b"GET"),
    (b":path", b"/api/hello"),
    (b":scheme", b"https"),
    (b":authority", b"127.0.0.1:8443"),
    (b"accept", b"*/*"),
    NeverIndexedHeaderTuple(b"authorization", TOKEN),
]

RECEIVED = {
    "good": GOOD,
    "good, typed": [HeaderTuple(*header) for header in GOOD],
    "good, host agrees": [*GOOD, (b"host", b"127.0.0.1:8443")],
    "good, te trailers": [*GOOD, (b"te", b"trailers")],
    "upper-case name": [*GOOD, (b"Accept-Language", b"en")],
    "empty name": [*GOOD, (b"", b"x")],
    "line break in value": [*GOOD, (b"x-note", b"a\r\nb")],
    "connection header": [*GOOD, (b"connection", b"keep-alive")],
    "te other than trailers": [*GOOD, (b"te", b"gzip")],
    "pseudo-header after a field": [*GOOD, (b":method", b"GET")],
    "unknown pseudo-header": [(b":protocol2", b"x"), *GOOD],
    "no path": [header for header in GOOD if header[0] != b":path"],
    "empty path": [(b":path", b"") if header[0] == b":path" else header for header in GOOD],
    "host disagrees": [*GOOD, (b"host", b"example.com")],
    "status in a request": [(b":status", b"200"), *GOOD[1:]],
}
SENT = {
    "plain": [(b":status", b"200"), (b"content-type", b"application/json")],
    "mixed case and spaces": [(b":status", b"200"), (b"Content-Type", b" text/plain ")],
    "connection-specific": [(b":status", b"200"), (b"connection", b"close")],
    "secrets": [(b":status", b"200"), (b"authorization", b"x"), (b"cookie", b"a=b")],
    "typed": [HeaderTuple(b":status", b"200"), NeverIndexedHeaderTuple(b"x-secret", b"s")],
    "as text": [(":status", "200"), ("content-length", "2")],
    "no status": [(b"content-type", b"application/json")],
}


def outcome(call: Any) -> tuple[str, Any]:
    """What a call returns (values and their tuple classes) or raises (type and text)."""
    try:
        headers = list(call())
    except Exception as exc:  # h2 raises ProtocolError, or asserts on text it never gets
        return "raised", (type(exc), str(exc))
    return "returned", [(type(header), tuple(header)) for header in headers]


@pytest.mark.parametrize("name", sorted(RECEIVED))
def test_received_headers_are_judged_as_h2_judges_them(name: str) -> None:
    headers = RECEIVED[name]
    expected = outcome(lambda: validate_headers(headers, REQUEST))
    for _ in range(3):  # the first call fills the memo, the others may use it
        assert outcome(lambda: h2_headers.memo_validate_headers(headers, REQUEST)) == expected


def test_a_refused_list_is_refused_every_time() -> None:
    bad = RECEIVED["upper-case name"]
    for _ in range(3):
        with pytest.raises(ProtocolError):
            h2_headers.memo_validate_headers(bad, REQUEST)
        assert list(h2_headers.memo_validate_headers(GOOD, REQUEST)) == GOOD


def test_the_flags_are_part_of_what_is_remembered() -> None:
    response = [(b":status", b"200")]
    assert list(h2_headers.memo_validate_headers(response, RESPONSE)) == response
    with pytest.raises(ProtocolError):
        h2_headers.memo_validate_headers(response, REQUEST)


@pytest.mark.parametrize("name", sorted(SENT))
@pytest.mark.parametrize("split_cookies", [False, True])
def test_sent_headers_are_rewritten_and_checked_as_h2_does(name: str, split_cookies: bool) -> None:
    headers = SENT[name]

    def original() -> Any:
        normalized = normalize_outbound_headers(headers, RESPONSE, split_cookies)
        return validate_outbound_headers(normalized, RESPONSE)

    def memoized() -> Any:
        normalized = h2_headers.memo_normalize_outbound_headers(headers, RESPONSE, split_cookies)
        return h2_headers.memo_validate_outbound_headers(normalized, RESPONSE)

    expected = outcome(original)
    for _ in range(3):
        assert outcome(memoized) == expected


def test_unhashable_headers_get_h2s_answer() -> None:
    listed = [list(header) for header in GOOD]
    assert list(h2_headers.memo_validate_headers(listed, REQUEST)) == listed  # type: ignore[arg-type]
    sent = [[b":status", b"200"]]
    normalized = h2_headers.memo_normalize_outbound_headers(sent, RESPONSE)  # type: ignore[arg-type]
    assert [tuple(header) for header in normalized] == [(b":status", b"200")]


def test_distinct_lists_stay_within_the_memo_bytes() -> None:
    kept = h2_headers._accepted
    for number in range(800):  # 4-12 KiB each: about twice the budget
        headers = [*GOOD, (b"x-pad", b"%06d" % number * (700 + number % 1400))]
        assert h2_headers.memo_validate_headers(headers, REQUEST) == tuple(headers)
        assert kept.used <= h2_headers.MEMO_BYTES
    assert kept.used > h2_headers.MEMO_BYTES - h2_headers.ENTRY_BYTES
    large = [*GOOD, (b"x-pad", b"z" * h2_headers.ENTRY_BYTES)]
    assert h2_headers.memo_validate_headers(large, REQUEST) == tuple(large)
    assert kept.get((validate_headers, tuple(large), REQUEST)) is None  # checked, not kept
    with pytest.raises(ProtocolError):  # and checked every time
        h2_headers.memo_validate_headers([*large, (b"Upper", b"x")], REQUEST)


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """200 with an empty body for every request."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize(
    "memo", [pytest.param(True, marks=pytest.mark.library_change("h2_headers")), False]
)
async def test_hypercorn_refuses_a_bad_request_after_accepting_good_ones(
    memo: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if memo:
        h2_headers.install()
    else:  # the same exchange against h2's own checks
        monkeypatch.setattr(h2.stream, "validate_headers", validate_headers)
    good = [
        (b":method", b"GET"),
        (b":path", b"/"),
        (b":scheme", b"http"),
        (b":authority", b"127.0.0.1"),
        (b"authorization", TOKEN),
    ]
    bad = [*good[:-1], (b"Authorization", TOKEN)]  # h2 requires lower-case names
    async with serving(ok_app) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        answers = [status(events) for events in await exchange(port, [good, good, bad])]
    assert answers[:2] == [b"200", b"200"]
    assert answers[2] in {"stream reset", CLOSED}

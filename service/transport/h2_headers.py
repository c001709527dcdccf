"""Check each distinct HTTP/2 header list once per worker.

h2 validates every header list it receives (RFC 9113, section 8.2: characters, empty
names, connection-specific fields, pseudo-headers, authority, path), and normalises and
validates every list it sends, each step a generator of its own: about a tenth of an
HTTP/2 request's CPU (py-spy). These steps are pure functions of the list and the
validation flags, and a client sends nearly the same list with every request. A list
accepted once is remembered; a list that fails is not, so it fails again, with the same
error. Clients choose the lists, so the memos are bounded in bytes (service/transport/
memo.py), and a list above ENTRY_BYTES is checked every time, as h2 does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import h2.stream
from h2.utilities import (
    HeaderValidationFlags,
    normalize_outbound_headers,
    validate_headers,
    validate_outbound_headers,
)
from hpack.struct import Header

from service.transport.memo import BoundedMemo, header_bytes
from service.transport.shapes import Shape, differing

MEMO_BYTES = 4 * 1024 * 1024  # per worker and memo
ENTRY_BYTES = 16 * 1024  # a request with a large token and cookies fits


Validator = Callable[[Iterable[Header], HeaderValidationFlags], Iterable[Header]]

_accepted: BoundedMemo[bool] = BoundedMemo(budget=MEMO_BYTES, entry_limit=ENTRY_BYTES)
_normalized: BoundedMemo[tuple[Header, ...]] = BoundedMemo(
    budget=MEMO_BYTES, entry_limit=ENTRY_BYTES
)


def _validated(
    validate: Validator, headers: Iterable[Header], flags: HeaderValidationFlags
) -> tuple[Header, ...]:
    """What validate gives (the same headers) or raises; accepted lists are remembered."""
    given = tuple(headers)
    key = (validate, given, flags)
    try:
        if _accepted.get(key):
            return given
    except TypeError:  # unhashable: h2 decides as it would have
        return tuple(validate(given, flags))
    for _ in validate(given, flags):
        pass
    _accepted.put(key, True, header_bytes(given))
    return given


def memo_validate_headers(
    headers: Iterable[Header], flags: HeaderValidationFlags
) -> tuple[Header, ...]:
    """h2's validate_headers: the same headers, or its ProtocolError."""
    return _validated(validate_headers, headers, flags)


def memo_validate_outbound_headers(
    headers: Iterable[Header], flags: HeaderValidationFlags
) -> tuple[Header, ...]:
    """h2's validate_outbound_headers: the same headers, or its ProtocolError."""
    return _validated(validate_outbound_headers, headers, flags)


def memo_normalize_outbound_headers(
    headers: Iterable[Header],
    flags: HeaderValidationFlags | None,
    should_split_outbound_cookies: bool = False,
) -> list[Header]:
    """h2's normalize_outbound_headers, as a list."""
    sent = tuple(headers)
    # h2 keeps a header's tuple class (never-indexed or not), so the classes are in the key.
    key = (sent, tuple(map(type, sent)), flags, should_split_outbound_cookies)
    try:
        normalized = _normalized.get(key)
    except TypeError:
        return list(normalize_outbound_headers(sent, flags, should_split_outbound_cookies))
    if normalized is None:
        normalized = tuple(normalize_outbound_headers(sent, flags, should_split_outbound_cookies))
        _normalized.put(key, normalized, header_bytes(sent) + header_bytes(normalized))
    return list(normalized)


SHAPES = [
    Shape(
        "H2Stream._build_headers_frames",
        h2.stream.H2Stream._build_headers_frames,
        ["self", "headers", "encoder", "first_frame", "hdr_validation_flags"],
        {"normalize_outbound_headers", "validate_outbound_headers"},
    ),
    Shape(
        "H2Stream._process_received_headers",
        h2.stream.H2Stream._process_received_headers,
        ["self", "headers", "header_validation_flags", "header_encoding"],
        {"validate_headers"},
    ),
    Shape("validate_headers", validate_headers, ["headers", "hdr_validation_flags"]),
    Shape(
        "validate_outbound_headers", validate_outbound_headers, ["headers", "hdr_validation_flags"]
    ),
    Shape(
        "normalize_outbound_headers",
        normalize_outbound_headers,
        ["headers", "hdr_validation_flags", "should_split_outbound_cookies"],
    ),
]


def shapes_differ() -> list[str]:
    """What of h2's internals this change relies on is not as it expects."""
    return differing(SHAPES)


def install() -> None:
    """Make h2's streams use the memos (idempotent; per process)."""
    stream = h2.stream
    stream.validate_headers = memo_validate_headers  # type: ignore[attr-defined,assignment]
    stream.validate_outbound_headers = memo_validate_outbound_headers  # type: ignore[attr-defined,assignment]
    stream.normalize_outbound_headers = memo_normalize_outbound_headers  # type: ignore[attr-defined,assignment]

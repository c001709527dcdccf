"""Check each distinct HTTP/2 header list once per worker.

h2 validates every header list it receives (RFC 9113, section 8.2: characters, empty
names, connection-specific fields, pseudo-headers, authority, path), and normalises and
validates every list it sends, each step a generator of its own: about a tenth of an
HTTP/2 request's CPU (py-spy). These steps are pure functions of the list and the
validation flags, and a client sends nearly the same list with every request. A list
accepted once is remembered (bounded); a list that fails is not, so it fails again,
with the same error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache

import h2.stream
from h2.utilities import (
    HeaderValidationFlags,
    normalize_outbound_headers,
    validate_headers,
    validate_outbound_headers,
)
from hpack.struct import Header

MEMO_SIZE = 4096


Validator = Callable[[Iterable[Header], HeaderValidationFlags], Iterable[Header]]


@lru_cache(maxsize=2 * MEMO_SIZE)
def _accepted(
    validate: Validator, headers: tuple[Header, ...], flags: HeaderValidationFlags
) -> bool:
    for _ in validate(headers, flags):
        pass
    return True


def _validated(
    validate: Validator, headers: Iterable[Header], flags: HeaderValidationFlags
) -> tuple[Header, ...]:
    """What validate gives (the same headers) or raises; accepted lists are remembered."""
    given = tuple(headers)
    try:
        _accepted(validate, given, flags)
    except TypeError:  # unhashable: h2 decides as it would have
        return tuple(validate(given, flags))
    return given


@lru_cache(maxsize=MEMO_SIZE)
def _normalized(
    headers: tuple[Header, ...],
    kinds: tuple[type, ...],  # h2 keeps a header's tuple class (never-indexed or not)
    flags: HeaderValidationFlags | None,
    split_cookies: bool,
) -> tuple[Header, ...]:
    return tuple(normalize_outbound_headers(headers, flags, split_cookies))


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
    try:
        kinds = tuple(map(type, sent))
        return list(_normalized(sent, kinds, flags, should_split_outbound_cookies))
    except TypeError:
        return list(normalize_outbound_headers(sent, flags, should_split_outbound_cookies))


def install() -> None:
    """Make h2's streams use the memos (idempotent; per process)."""
    stream = h2.stream
    stream.validate_headers = memo_validate_headers  # type: ignore[attr-defined,assignment]
    stream.validate_outbound_headers = memo_validate_outbound_headers  # type: ignore[attr-defined,assignment]
    stream.normalize_outbound_headers = memo_normalize_outbound_headers  # type: ignore[attr-defined,assignment]

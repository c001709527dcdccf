"""Time-ordered identifiers (UUIDv7, RFC 9562) for users, sessions and tokens."""

from __future__ import annotations

import os
import time
import uuid


def uuid7() -> uuid.UUID:
    """Return a UUIDv7: 48 bits of Unix milliseconds, then 74 random bits."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF
    return uuid.UUID(int=value)


def new_id() -> str:
    """Return a new UUIDv7 as 32 hex digits, the form used for jti and sid claims."""
    return uuid7().hex


def issued_millis(identifier: str) -> int:
    """Return the Unix milliseconds embedded in a UUIDv7 given as hex (dashes allowed)."""
    return int(identifier.replace("-", "")[:12], 16)

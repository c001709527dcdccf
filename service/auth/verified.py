"""A bounded memo of verified tokens: a token seen again skips its signature check.

A token's signature and claim checks depend only on its bytes and the key, so a token
verified once needs only its expiry checked again. An entry is used only while the key
loader still returns the key that verified it, so a removed signing key ends its entries
at once. It holds no revocation answer: those are the kept verdicts of
service/store/revocation_feed.py, which every revocation naming them drops.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KeyLoader = Callable[[dict[str, Any], dict[str, Any]], Any]

MEMO_BYTES = 32 * 1024 * 1024  # per worker, whatever the entry count setting allows
TOKEN_BYTES = 8 * 1024  # longer tokens are verified every time


def entry_cost(token: str) -> int:
    """Bytes an entry is charged."""
    # The token, its decoded header and claims (shorter than their base64 in the token),
    # and an allowance for the dicts that hold them.
    return 2 * len(token) + 1024


@dataclass(frozen=True, slots=True)
class Verified:
    """What one successful verification established."""

    header: dict[str, Any]
    claims: dict[str, Any]
    key: Any
    expires_at: float


class VerifiedTokens:
    """Tokens that passed full verification, oldest dropped first beyond `size` or MEMO_BYTES."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: dict[str, Verified] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str, key_loader: KeyLoader) -> dict[str, Any] | None:
        """The claims of a token verified before, still unexpired and under the same key."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        # PyJWT's rule with no leeway: a token is expired once exp <= now.
        if entry.expires_at <= time.time() or not _still_signed_by(entry, key_loader):
            with self._lock:
                if self._entries.pop(token, None) is not None:
                    self._bytes -= entry_cost(token)
            return None
        return dict(entry.claims)

    def peek(self, token: str) -> dict[str, Any] | None:
        """The claims recorded for a token, unchecked: only to know what to ask about."""
        entry = self._entries.get(token)
        return None if entry is None else entry.claims

    def header(self, token: str) -> dict[str, Any] | None:
        """A copy of the header recorded for a token (it was verified along with it)."""
        entry = self._entries.get(token)
        return None if entry is None else dict(entry.header)

    def remember(self, token: str, entry: Verified) -> None:
        """Record a token that has just passed full verification."""
        if self._size <= 0 or len(token) > TOKEN_BYTES:
            return
        cost = entry_cost(token)
        with self._lock:
            if self._entries.pop(token, None) is not None:
                self._bytes -= cost
            while self._entries and (
                len(self._entries) >= self._size or self._bytes + cost > MEMO_BYTES
            ):
                oldest = next(iter(self._entries))
                del self._entries[oldest]
                self._bytes -= entry_cost(oldest)
            self._entries[token] = entry
            self._bytes += cost


def _still_signed_by(entry: Verified, key_loader: KeyLoader) -> bool:
    """Whether the key loader still picks the key that verified the entry."""
    try:
        current = key_loader(entry.header, entry.claims)
    except Exception:  # any refusal means: verify afresh
        return False
    return current is entry.key or bool(current == entry.key)

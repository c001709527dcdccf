"""A bounded memo of verified tokens: a token seen again skips its signature check.

A token's signature and claim checks depend only on its bytes and the key, so a token
verified once needs only its expiry checked again. An entry is used only while the key
loader still returns the key that verified it, so a removed signing key ends its entries
at once. Revocation is not memoised: the blocklist is asked on every request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KeyLoader = Callable[[dict[str, Any], dict[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class Verified:
    """What one successful verification established."""

    header: dict[str, Any]
    claims: dict[str, Any]
    key: Any
    expires_at: float


class VerifiedTokens:
    """Tokens that passed full verification, oldest dropped first beyond `size`."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: dict[str, Verified] = {}
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
                self._entries.pop(token, None)
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
        if self._size <= 0:
            return
        with self._lock:
            if len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)), None)
            self._entries[token] = entry


def _still_signed_by(entry: Verified, key_loader: KeyLoader) -> bool:
    """Whether the key loader still picks the key that verified the entry."""
    try:
        current = key_loader(entry.header, entry.claims)
    except Exception:  # any refusal means: verify afresh
        return False
    return current is entry.key or bool(current == entry.key)

"""Request parameters of the OAuth endpoints: each may appear once (RFC 6749 3.1, 3.2)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# Every parameter these endpoints read. Others are ignored, as RFC 6749 3.1 asks, even
# when repeated (RFC 8707's resource, for one, may be).
KNOWN = frozenset(
    {
        "client_id",
        "client_secret",
        "code",
        "code_challenge",
        "code_challenge_method",
        "code_verifier",
        "csrf_token",
        "decision",
        "grant_type",
        "redirect_uri",
        "refresh_token",
        "response_mode",
        "response_type",
        "scope",
        "state",
        "token",
        "token_type_hint",
    }
)


def repeated_parameter(*sources: Iterable[tuple[str, str]]) -> str | None:
    """The first known parameter named more than once across sources (query and body)."""
    counts = Counter(name for source in sources for name, _ in source if name in KNOWN)
    return next((name for name, count in counts.items() if count > 1), None)

"""Ask the blocklist about a request's token before Flask runs, without blocking the loop.

For requests served on the event loop (@runs_inline), the token's revocation status is
awaited through the check pipeline first; `is_revoked` then uses that answer, given for
the same token moments before, instead of a blocking round trip of its own. Only tokens
that passed full verification earlier are looked up here (the memo knows their claims);
a new token takes the blocking path once.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from flask import Flask

from service import metrics
from service.auth.verified import VerifiedTokens
from service.store.blocklist import BlocklistUnavailable, TokenRef, Verdict

ENVIRON_KEY = "service.revocation"
BEARER = "Bearer "

Answer = tuple[TokenRef, Verdict | BlocklistUnavailable]


def revocation_prefetch(app: Flask) -> Callable[[dict[str, Any]], Awaitable[None]] | None:
    """The adapter's hook for inline requests, or None where nothing is checked."""
    memo: VerifiedTokens | None = app.extensions.get("verified_tokens")
    if memo is None or not app.config["REVOCATION_CHECK"]:
        return None
    store = app.extensions["store"]

    async def prefetch(environ: dict[str, Any]) -> None:
        header = environ.get("HTTP_AUTHORIZATION", "")
        if not header.startswith(BEARER):
            return
        claims = memo.peek(header[len(BEARER) :])
        if claims is None:
            return
        ref = TokenRef.from_claims(claims)
        answer: Verdict | BlocklistUnavailable
        started = time.perf_counter()
        try:
            answer = await store.check_async(ref)
        except BlocklistUnavailable as exc:
            answer = exc
        metrics.check_timed("pipelined", time.perf_counter() - started)
        environ[ENVIRON_KEY] = (ref, answer)

    return prefetch


def prefetched(environ: dict[str, Any], ref: TokenRef) -> Verdict | None:
    """The answer fetched for exactly this token before the view ran, if any."""
    answer: Answer | None = environ.get(ENVIRON_KEY)
    if answer is None or answer[0] != ref:
        return None
    if isinstance(answer[1], BlocklistUnavailable):
        raise answer[1]
    return answer[1]

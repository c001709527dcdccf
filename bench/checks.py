"""Correctness under load: is a token refused on every worker once its logout has answered?"""

from __future__ import annotations

import json
import ssl
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from client import Pair, call, connect

THREADS = 4


@dataclass(frozen=True)
class LogoutOutcome:
    """One logout and the GET that followed it on a new connection."""

    logout: int
    hello: int
    cross_worker: bool


def _worker(body: bytes) -> object:
    """The worker pid a /healthz body names, if any."""
    try:
        return json.loads(body).get("worker")
    except ValueError:
        return None


def _logout_then_get(port: int, context: ssl.SSLContext, pair: Pair) -> LogoutOutcome:
    """Log out on one connection, then GET with the same token on another (opened before).

    Both connections use the token twice first, so that each worker holds a kept verdict
    for it (if it keeps verdicts) that the logout has to reach.
    """
    first, second = connect(port, context), connect(port, context)
    try:
        for connection in (first, second) * 2:
            call(connection, "GET", "/api/hello", token=pair.access)
        _, worker_first = call(first, "GET", "/healthz")
        logout, _ = call(first, "POST", "/auth/logout", token=pair.access)
        hello, _ = call(second, "GET", "/api/hello", token=pair.access)
        _, worker_second = call(second, "GET", "/healthz")
    finally:
        first.close()
        second.close()
    cross = _worker(worker_first) != _worker(worker_second)
    return LogoutOutcome(logout, hello, cross)


def accepted_after_logout(port: int, context: ssl.SSLContext, pairs: list[Pair]) -> dict[str, int]:
    """Count revoked tokens still accepted right after their logout answered (expect 0)."""
    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = list(pool.map(lambda pair: _logout_then_get(port, context, pair), pairs))
    done = [o for o in outcomes if o.logout == 204]
    statuses = Counter(o.hello for o in done)
    return {
        "logouts": len(outcomes),
        "logouts_204": len(done),
        "accepted": statuses.get(200, 0),
        "refused_401": statuses.get(401, 0),
        "other": sum(n for status, n in statuses.items() if status not in (200, 401)),
        "cross_worker": sum(o.cross_worker for o in done),
    }

"""What the service counts and times, for GET /metrics (served by service/exposition.py).

Under `serve`, every worker records into prometheus-client's multiprocess files in a
directory the master made for this run, so a scrape sums all workers, dead ones included;
elsewhere (tests, commands) values live in process memory. Label values come from fixed
sets (url rules, statuses, kinds, reasons), never a raw path or another string a client
chose: the series stay bounded.

What every request records (its count and duration, the revocation check's duration, the
kept verdict's hit or miss) goes through a tally first: in multiprocess mode each of
prometheus-client's increments takes a lock, asks for the pid and writes its file (about
0.7 us; a protected GET made six, with their wrappers about 15 us, 6% of its CPU). The
tally adds to plain numbers under one lock, and a thread of each process hands the sums
to prometheus-client every FLUSH_SECONDS: a scrape sees a request at most that late, and
a worker killed outright loses at most that much. Rarer events are recorded at once.
"""

from __future__ import annotations

import atexit
import bisect
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from prometheus_client import Counter, Gauge, Histogram

P = ParamSpec("P")
T = TypeVar("T")

FLUSH_SECONDS = 1.0
UNMATCHED = "unmatched"  # the route label of a request no url rule matched (404, 405)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
TOKEN_KINDS = ("access", "refresh", "oauth_access", "oauth_refresh", "client_credentials")
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
CHECK_BUCKETS = (
    0.00001,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.5,
    1,
)

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "authsvc_http_requests",
    "Requests the app answered, by url rule (never the raw path), method and status.",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "authsvc_http_request_duration_seconds",
    "Time the app took to answer a request, by url rule and method.",
    ["route", "method"],
    buckets=REQUEST_BUCKETS,
)
LOGINS = Counter("authsvc_logins", "Successful sign-ins (API login, OAuth login page).")
LOGIN_FAILURES = Counter(
    "authsvc_login_failures",
    "Refused sign-ins: wrong credentials, or throttled (429) after too many.",
    ["reason"],
)
TOKENS_ISSUED = Counter("authsvc_tokens_issued", "Tokens issued, by kind.", ["kind"])
REVOCATIONS = Counter(
    "authsvc_revocations",
    "Revocations recorded (a session, a user's sessions, a grant or one token), by reason.",
    ["reason"],
)
EARLIER_KEY_TOKENS = Counter(
    "authsvc_tokens_under_earlier_key",
    "Requests whose first-party token verified only under a fallback key "
    "(JWT_SECRET_FALLBACKS, JWT_PUBLIC_KEY_FALLBACK_FILES).",
)
REPLAYS = Counter(
    "authsvc_replays_detected",
    "Spent refresh tokens or authorization codes presented again (each revokes its session).",
    ["token"],
)
AUDIT_EVENTS = Counter(
    "authsvc_audit_events", "Other audited events (service/events.py), by event.", ["event"]
)
KEPT_VERDICTS = Counter(
    "authsvc_kept_verdicts",
    "Pipelined revocation checks answered from a kept verdict (hit) or sent to Redis (miss).",
    ["result"],
)
CHECK_SECONDS = Histogram(
    "authsvc_blocklist_check_duration_seconds",
    "Time of a revocation check's Redis round trip (kept verdicts answer without one).",
    ["way"],
    buckets=CHECK_BUCKETS,
)
REDIS_ERRORS = Counter(
    "authsvc_redis_errors", "Redis calls that failed or timed out, by operation.", ["operation"]
)
DATABASE_ERRORS = Counter(
    "authsvc_database_errors",
    "PostgreSQL errors: unavailable (down, timed out), pool_timeout, or error (any other).",
    ["kind"],
)
REBUILDS = Counter(
    "authsvc_blocklist_rebuilds",
    "Loads of the blocklist from the durable record: loaded, lost (Redis restarted meanwhile "
    "or another process loads it), failed (Redis error).",
    ["outcome"],
)
WORKERS = Gauge("authsvc_workers", "Worker processes serving now.", multiprocess_mode="livesum")
DOUBTING = Gauge(
    "authsvc_workers_doubting_redis",
    "Workers whose checks fail closed (503) for some users until a recovery: a Redis call "
    "failed there since the last one.",
    multiprocess_mode="livesum",
)


class Tally:
    """Counts and observations of this process, handed to prometheus-client in batches."""

    def __init__(self, period: float = FLUSH_SECONDS) -> None:
        self._period = period
        self._lock = threading.Lock()
        self._counts: dict[Any, float] = {}
        # A histogram child -> its pending observations per bucket, then their sum.
        self._observed: dict[Any, list[float]] = {}
        self._flusher: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._forget)

    def count(self, child: Any) -> None:
        """Add one to a counter (a prometheus-client child)."""
        with self._lock:
            self._counts[child] = self._counts.get(child, 0.0) + 1.0
        if self._flusher is None:
            self._start()

    def observe(self, child: Any, bounds: tuple[float, ...], value: float) -> None:
        """Observe value in a histogram child whose bucket bounds are bounds."""
        index = bisect.bisect_left(bounds, value)  # its bucket: the first bound >= value
        with self._lock:
            pending = self._observed.get(child)
            if pending is None:
                pending = self._observed[child] = [0.0] * (len(bounds) + 1)
            pending[index] += 1.0
            pending[-1] += value
        if self._flusher is None:
            self._start()

    def flush(self) -> None:
        """Hand everything counted so far to prometheus-client."""
        with self._lock:
            counts, self._counts = self._counts, {}
            observed, self._observed = self._observed, {}
        for child, amount in counts.items():
            child.inc(amount)
        for child, pending in observed.items():
            add_observations(child, pending)

    def _start(self) -> None:
        with self._lock:
            if self._flusher is not None:
                return
            self._flusher = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._flusher.start()
        atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            time.sleep(self._period)
            try:
                self.flush()
            except Exception:  # the next round tries again
                log.exception("metrics not recorded")

    def _forget(self) -> None:
        """In a forked child: the parent's counts are the parent's, and so is its thread."""
        self._lock = threading.Lock()
        self._counts, self._observed, self._flusher = {}, {}, None


def add_observations(child: Any, pending: list[float]) -> None:
    """Add observations to a prometheus-client histogram child: counts per bucket, then sum.

    Histogram.observe() takes one value; a batch goes into the child's bucket and sum
    values directly (private to prometheus-client, and unchanged for years: the
    metrics tests compare the exposition with what observe() gives).
    """
    for index, amount in enumerate(pending[:-1]):
        if amount:
            child._buckets[index].inc(amount)
    child._sum.inc(pending[-1])


TALLY = Tally()
_CHECKED = {way: CHECK_SECONDS.labels(way) for way in ("redis",)}
_CHECK_BOUNDS = (*CHECK_BUCKETS, float("inf"))
_REQUEST_BOUNDS = (*REQUEST_BUCKETS, float("inf"))
_KEPT = (KEPT_VERDICTS.labels("miss"), KEPT_VERDICTS.labels("hit"))
_ISSUED = {kind: TOKENS_ISSUED.labels(kind) for kind in TOKEN_KINDS}
# (route, method, status) -> its request counter and duration histogram. Bounded: routes
# are the app's url rules, methods METHODS or "other", statuses what the app answers.
_requests: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def request_answered(route: str, method: str, status: int, seconds: float) -> None:
    """Count one request and observe its duration."""
    if method not in METHODS:
        method = "other"
    key = (route, method, status)
    children = _requests.get(key)
    if children is None:
        children = _requests[key] = (
            REQUESTS.labels(route, method, str(status)),
            REQUEST_SECONDS.labels(route, method),
        )
    TALLY.count(children[0])
    TALLY.observe(children[1], _REQUEST_BOUNDS, seconds)


def check_timed(way: str, seconds: float) -> None:
    """Observe how long one revocation check's round trip took (way: redis)."""
    TALLY.observe(_CHECKED[way], _CHECK_BOUNDS, seconds)


def kept_verdict(hit: bool) -> None:
    """Count a lookup among the kept verdicts."""
    TALLY.count(_KEPT[hit])


def tokens_issued(*kinds: str) -> None:
    """Count tokens issued, one per kind named (TOKEN_KINDS)."""
    for kind in kinds:
        _ISSUED[kind].inc()


def token_under_earlier_key() -> None:
    """Count a request whose token only a fallback first-party key verifies."""
    TALLY.count(EARLIER_KEY_TOKENS)


def revoked(reason: str) -> None:
    """Count a revocation recorded for reason (a fixed word, such as "logout")."""
    REVOCATIONS.labels(reason).inc()


def redis_error(operation: str) -> None:
    """Count a failed Redis call of one operation (check, write, throttle)."""
    REDIS_ERRORS.labels(operation).inc()


def database_error(kind: str) -> None:
    """Count a PostgreSQL error: unavailable, pool_timeout or error."""
    DATABASE_ERRORS.labels(kind).inc()


def timed_check(
    check: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Decorate the check's Redis round trip: its duration is observed, also when it fails."""

    @functools.wraps(check)
    async def timed(*args: P.args, **kwargs: P.kwargs) -> T:
        started = time.perf_counter()
        try:
            return await check(*args, **kwargs)
        finally:
            check_timed("redis", time.perf_counter() - started)

    return timed


def counted_rebuild(
    rebuild: Callable[P, Coroutine[Any, Any, bool]],
) -> Callable[P, Coroutine[Any, Any, bool]]:
    """Decorate a blocklist rebuild: each call counts as loaded, lost or failed."""

    @functools.wraps(rebuild)
    async def counted(*args: P.args, **kwargs: P.kwargs) -> bool:
        try:
            done = await rebuild(*args, **kwargs)
        except Exception:
            REBUILDS.labels("failed").inc()
            raise
        REBUILDS.labels("loaded" if done else "lost").inc()
        return done

    return counted


def worker_started() -> None:
    """Count this process among the serving workers (until the master marks it dead)."""
    WORKERS.set(1)


def doubting_redis(doubting: bool) -> None:
    """Count this process among the workers that doubt Redis, or no longer."""
    DOUBTING.set(1 if doubting else 0)

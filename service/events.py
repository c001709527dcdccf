"""Audit events: one log line on the `service.audit` logger and one counter, per event.

Domain functions call `audit(event, **fields)` where something happens to an account, a
session, a client or a key, naming who by id (user_id, client_id, sid, grant_id, kid).
The line also carries the request id (through the log handler) and, inside a request, the
client's address. Fields are ids, counts and fixed words: never a token, a password, a
secret or a code (no call site passes one, and tests/test_observability.py greps a full
run's logs for each).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import has_request_context, request

from service import metrics
from service.addresses import client_address

log = logging.getLogger("service.audit")

# Each event's counter; every other event counts in authsvc_audit_events_total{event}.
COUNTERS: dict[str, Any] = {
    "login": metrics.LOGINS,
    "login_failed": metrics.LOGIN_FAILURES.labels("credentials"),
    "login_throttled": metrics.LOGIN_FAILURES.labels("throttled"),
    "refresh_replay": metrics.REPLAYS.labels("refresh"),
    "oauth_refresh_replay": metrics.REPLAYS.labels("oauth_refresh"),
    "code_replay": metrics.REPLAYS.labels("code"),
}
# Events that need a look: logged as warnings, the others as information.
WARNINGS = frozenset({"login_throttled", "refresh_replay", "oauth_refresh_replay", "code_replay"})


def audit(event: str, **fields: object) -> None:
    """Log one audit line for event with fields (ids only), and count it."""
    counter = COUNTERS.get(event)
    if counter is None:
        counter = metrics.AUDIT_EVENTS.labels(event)
    counter.inc()
    line: dict[str, object] = {"event": event}
    line.update((name, str(value)) for name, value in fields.items() if value is not None)
    if has_request_context():
        line.setdefault("address", client_address(request.environ))
    level = logging.WARNING if event in WARNINGS else logging.INFO
    log.log(level, "audit %s", event, extra={"fields": line})

"""Failed client authentication, counted per client id and per address.

Client secrets are 256-bit random values: no rate of guessing finds one, so a correct
secret is never refused, and nobody can lock a client out by failing in its name from
elsewhere. What the counters stop is a client or script that keeps failing: past
CLIENT_FAILURES_PER_CLIENT failures naming one client id, or CLIENT_FAILURES_PER_ADDRESS
from one address, within THROTTLE_WINDOW, a failure is answered 429 `slow_down` with
Retry-After instead of 401 `invalid_client` (RFC 6749 5.2 ties invalid_client to 401
when the client used HTTP Basic; slow_down is the registered code for "slow down",
RFC 8628 3.5). An unknown client id is counted like a known one.

If Redis cannot count, the failure is answered as usual (fail open, logged by the store):
a secret that cannot be guessed loses nothing by it, and clients keep working.
"""

from __future__ import annotations

import concurrent.futures
import math
from typing import Any

from authlib.oauth2 import OAuth2Error
from flask import current_app
from flask import request as http_request

from service.addresses import address_group, client_address
from service.config import Settings
from service.loop import WorkerLoop, WouldBlock
from service.oauth.prefetch import named_clients
from service.store.throttle import Attempt, Counter, ThrottleUnavailable, get_throttle

# On Hypercorn's event loop (a client_credentials request run inline) the count is waited
# for briefly, so a stalled Redis cannot stall the loop; it still lands in the background.


class SlowDown(OAuth2Error):  # type: ignore[misc]
    """429 slow_down, with the seconds to wait in Retry-After."""

    error = "slow_down"

    def __init__(self, wait: float) -> None:
        self.retry_after = max(1, math.ceil(wait))
        super().__init__(
            description="Too many failed client authentications; retry after Retry-After.",
            status_code=429,
        )

    def get_headers(self) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = super().get_headers()
        return [*headers, ("Retry-After", str(self.retry_after))]


def client_attempt(*, settings: Settings, client_ids: list[str], address: str) -> Attempt:
    """The counters a client authentication naming client_ids from address meets."""
    group = address_group(address)
    per_client = settings.client_failures_per_client
    return Attempt(
        kind="client",
        counters=(
            *(Counter("id", (client_id,), per_client) for client_id in client_ids),
            Counter("address", (group,), settings.client_failures_per_address),
        ),
        window=settings.throttle_window,
    )


def counted(failure: OAuth2Error) -> OAuth2Error:
    """Count a failed client authentication of this request; the error to answer with."""
    loop: WorkerLoop = current_app.extensions["loop"]
    settings: Settings = current_app.extensions["settings"]
    environ: dict[str, Any] = http_request.environ
    attempt = client_attempt(
        settings=settings, client_ids=named_clients(environ), address=client_address(environ)
    )
    if loop.in_loop_thread():
        raise WouldBlock("counting a failed client authentication needs Redis")
    future = loop.submit(get_throttle().fail(attempt))
    try:
        wait = future.result(settings.redis_timeout * 2)
    except (ThrottleUnavailable, concurrent.futures.TimeoutError):
        return failure
    return SlowDown(wait) if wait > 0 else failure

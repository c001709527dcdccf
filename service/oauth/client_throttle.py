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
import io
import math
from base64 import b64decode
from typing import Any
from urllib.parse import parse_qsl, unquote

from authlib.oauth2 import OAuth2Error
from flask import current_app
from flask import request as http_request

from service.addresses import address_group, client_address
from service.config import Settings
from service.loop import WorkerLoop
from service.oauth.clients import plausible_identifier
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
    try:
        wait = loop.run(get_throttle().fail(attempt), timeout=settings.redis_timeout * 2)
    except (ThrottleUnavailable, TimeoutError, concurrent.futures.TimeoutError):
        return failure
    return SlowDown(wait) if wait > 0 else failure


FORM = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 8192  # token requests are a few hundred bytes
Form = list[tuple[str, str]]


def named_clients(environ: dict[str, Any]) -> list[str]:
    """The plausible client ids of the request's Basic credentials and form, in that order."""
    form = _form(environ)
    basic = _basic_client_id(environ.get("HTTP_AUTHORIZATION", ""))
    posted = next((value for name, value in form or () if name == "client_id"), None)
    return list(dict.fromkeys(c for c in (basic, posted) if c and plausible_identifier(c)))


def _basic_client_id(header: str) -> str | None:
    """The client id of Basic credentials with a secret, read as Authlib reads it."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        credentials = b64decode(token.strip()).decode()
    except ValueError:  # not base64, or not UTF-8
        return None
    client_id, colon, secret = credentials.partition(":")
    return unquote(client_id) if colon and secret else None


def _form(environ: dict[str, Any]) -> Form | None:
    """A urlencoded body's fields as Werkzeug's form parser reads it; None if it might not."""
    mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
    body = environ.get("wsgi.input")
    if mimetype != FORM or not isinstance(body, io.BytesIO):
        return None
    data = body.getvalue()
    if len(data) > MAX_FORM_BYTES:
        return None
    try:
        # Strict: where Werkzeug would replace bytes that are not UTF-8, nothing is read.
        return parse_qsl(data.decode(), keep_blank_values=True, errors="strict")
    except UnicodeError:
        return None

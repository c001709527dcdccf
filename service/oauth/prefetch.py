"""Look up the clients an OAuth request names on the event loop, before its view runs.

The token, revocation and introspection views run in request threads, where every store
call is a round trip through the app's loop. The adapter awaits this hook first: it reads
the client ids the request names (HTTP Basic, the form's client_id), looks them up in one
statement, and leaves the answer in the environ. `query_client` uses it for exactly those
ids and looks any other one up itself; nothing is kept across requests, so a deleted
client or a rotated secret counts from the next request on.
"""

from __future__ import annotations

import asyncio
import io
import logging
from base64 import b64decode
from typing import Any
from urllib.parse import parse_qsl, unquote

from service.config import Settings
from service.oauth.clients import plausible_identifier
from service.oauth.models import Client
from service.oauth.reader import ClientReader, connect_args

ENVIRON_KEY = "service.oauth_clients"
PATHS = frozenset({"/oauth/token", "/oauth/revoke", "/oauth/introspect"})
FORM = "application/x-www-form-urlencoded"
# Token requests are a few hundred bytes: a larger body is left to the view to parse.
MAX_FORM_BYTES = 8192
# A lookup answers in a millisecond; past this the view tries again on its own.
TIMEOUT = 2.0

log = logging.getLogger(__name__)


class ClientPrefetch:
    """The adapter's hook for requests served in a thread (PostgreSQL only)."""

    def __init__(self, settings: Settings) -> None:
        args = connect_args(settings)
        self._reader = ClientReader(args) if args is not None else None

    async def __call__(self, environ: dict[str, Any]) -> None:
        if self._reader is None or environ["REQUEST_METHOD"] != "POST":
            return
        if environ["PATH_INFO"] not in PATHS:
            return
        client_ids = named_clients(environ)
        if not client_ids:
            return
        try:
            async with asyncio.timeout(TIMEOUT):
                found = await self._reader.find(client_ids)
        except Exception as exc:
            log.warning("clients not looked up ahead (%s): the view will", type(exc).__name__)
            return
        if found is not None:
            environ[ENVIRON_KEY] = found

    async def close(self) -> None:
        """Release the connections (at worker shutdown, on the server's loop)."""
        if self._reader is not None:
            await self._reader.close()


def named_clients(environ: dict[str, Any]) -> list[str]:
    """The plausible client ids of the request's Basic credentials and form, in that order."""
    named = [_basic_client_id(environ.get("HTTP_AUTHORIZATION", "")), _form_client_id(environ)]
    return list(dict.fromkeys(c for c in named if c is not None and plausible_identifier(c)))


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


def _form_client_id(environ: dict[str, Any]) -> str | None:
    """The first client_id of a urlencoded body, as Werkzeug's form parser gives it."""
    mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
    body = environ.get("wsgi.input")
    if mimetype != FORM or not isinstance(body, io.BytesIO):
        return None
    data = body.getvalue()
    if len(data) > MAX_FORM_BYTES:
        return None
    try:
        text = data.decode()
    except UnicodeError:
        return None
    pairs = parse_qsl(text, keep_blank_values=True, errors="replace")
    return next((value for name, value in pairs if name == "client_id"), None)


def prefetched(environ: dict[str, Any], client_id: str) -> tuple[bool, Client | None]:
    """Whether client_id was looked up for this request, and what was found."""
    found: dict[str, Client | None] | None = environ.get(ENVIRON_KEY)
    if found is None or client_id not in found:
        return False, None
    return True, found[client_id]

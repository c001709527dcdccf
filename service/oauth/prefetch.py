"""Look up the clients an OAuth request names on the event loop, before its view runs.

The token, revocation and introspection views run in request threads, where every store
call is a round trip to the loop and back. The adapter awaits this hook first, on the
loop: it reads the client ids the request names (HTTP Basic, the form's client_id), looks
them up in one statement on the store's pool, and leaves the answer in the environ.
`query_client` uses it for exactly those ids and looks any other one up itself; nothing
is kept across requests, so a deleted client or a rotated secret counts from the next
request on.

A client_credentials token request needs nothing else from the store: once its clients
are looked up, and when the signing keys need no reread, it runs on the loop itself.
"""

from __future__ import annotations

import asyncio
import io
import logging
from base64 import b64decode
from typing import Any
from urllib.parse import parse_qsl, unquote

from service.oauth.clients import find_clients, plausible_identifier
from service.oauth.keys import Keyring
from service.oauth.models import Client
from service.store.db import Database

ENVIRON_KEY = "service.oauth_clients"
TOKEN_ENDPOINT = "/oauth/token"  # noqa: S105 - a path, not a secret
PATHS = frozenset({TOKEN_ENDPOINT, "/oauth/revoke", "/oauth/introspect"})
FORM = "application/x-www-form-urlencoded"
# Token requests are a few hundred bytes: a larger body is left to the view to parse.
MAX_FORM_BYTES = 8192
# A lookup answers in a millisecond; past this the view tries again on its own.
TIMEOUT = 2.0

Form = list[tuple[str, str]]

log = logging.getLogger(__name__)


class ClientPrefetch:
    """The adapter's hook for OAuth requests bound for a thread."""

    def __init__(self, database: Database, keyring: Keyring) -> None:
        self._database = database
        self._keyring = keyring

    async def __call__(self, environ: dict[str, Any]) -> bool:
        """Look the clients up; True when the request may now run on the loop."""
        if environ["REQUEST_METHOD"] != "POST" or environ["PATH_INFO"] not in PATHS:
            return False
        form = _form(environ)
        client_ids = _named(environ, form)
        if not client_ids:
            return False
        try:
            async with asyncio.timeout(TIMEOUT):
                found = await find_clients(database=self._database, client_ids=client_ids)
        except Exception as exc:
            log.warning("clients not looked up ahead (%s): the view will", type(exc).__name__)
            return False
        environ[ENVIRON_KEY] = found
        return _issues_client_token(environ, form) and self._keyring.signs_without_waiting()


def _issues_client_token(environ: dict[str, Any], form: Form | None) -> bool:
    """Whether Authlib will read a client_credentials token request naming the ids read here.

    Without a query string, its grant_type and client_id are the form's first ones: every
    client it queries was looked up ahead.
    """
    if environ["PATH_INFO"] != TOKEN_ENDPOINT or environ.get("QUERY_STRING") or form is None:
        return False
    return next((value for name, value in form if name == "grant_type"), None) == (
        "client_credentials"
    )


def named_clients(environ: dict[str, Any]) -> list[str]:
    """The plausible client ids of the request's Basic credentials and form, in that order."""
    return _named(environ, _form(environ))


def _named(environ: dict[str, Any], form: Form | None) -> list[str]:
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


def prefetched(environ: dict[str, Any], client_id: str) -> tuple[bool, Client | None]:
    """Whether client_id was looked up for this request, and what was found."""
    found: dict[str, Client | None] | None = environ.get(ENVIRON_KEY)
    if found is None or client_id not in found:
        return False, None
    return True, found[client_id]

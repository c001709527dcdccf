"""The references' OAuth 2.0 token endpoint (client_credentials only), framework-free.

One fixed confidential client kept in memory: its id, and its secret as a SHA-256 digest
compared with hmac.compare_digest, as the service stores and checks it; client_secret_basic.
Access tokens are RFC 9068-style ES256 JWTs signed with PyJWT by a P-256 key generated when
the worker starts (one per worker: nothing here verifies them).

Environment: BENCH_CLIENT_ID, BENCH_CLIENT_SECRET.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import Mapping
from urllib.parse import unquote

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

ISSUER = AUDIENCE = "authsvc"
ACCESS_TTL = 900
SCOPES = ("profile", "email")  # the client's scopes: every scope the service knows
FORM = "application/x-www-form-urlencoded"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

CLIENT_ID = os.environ.get("BENCH_CLIENT_ID", "bench-client")
SECRET_DIGEST = hashlib.sha256(os.environ["BENCH_CLIENT_SECRET"].encode()).hexdigest()
KEY = ec.generate_private_key(ec.SECP256R1())
KID = secrets.token_urlsafe(8)

Answer = tuple[int, dict[str, object], dict[str, str]]


def token(authorization: str | None, form: Mapping[str, str]) -> Answer:
    """Status, JSON body and headers of one token request."""
    if form.get("grant_type") != "client_credentials":
        return _error(400, "unsupported_grant_type")
    if not _authenticated(authorization):
        return _error(401, "invalid_client", {"WWW-Authenticate": 'Basic error="invalid_client"'})
    scope = _granted(form.get("scope"))
    if scope is None:
        return _error(400, "invalid_scope")
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": CLIENT_ID, "aud": AUDIENCE, "exp": now + ACCESS_TTL}
    claims |= {"iat": now, "jti": str(uuid.uuid4()), "client_id": CLIENT_ID, "scope": scope}
    access = jwt.encode(claims, KEY, algorithm="ES256", headers={"typ": "at+jwt", "kid": KID})
    body = {"access_token": access, "token_type": "Bearer", "expires_in": ACCESS_TTL}
    return 200, body | {"scope": scope}, NO_STORE


def _authenticated(authorization: str | None) -> bool:
    """HTTP Basic with the client's id and secret (each form-urlencoded, RFC 6749 2.3.1)."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        client_id, colon, secret = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    digest = hashlib.sha256(unquote(secret).encode()).hexdigest()
    return (
        bool(colon)
        and unquote(client_id) == CLIENT_ID
        and hmac.compare_digest(digest, SECRET_DIGEST)
    )


def _granted(scope: str | None) -> str | None:
    """The scope to grant: the client's own if none is asked for; None if any is unknown."""
    if scope is None:
        return " ".join(SCOPES)
    requested = dict.fromkeys(scope.split())
    if not requested or not set(requested) <= set(SCOPES):
        return None
    return " ".join(requested)


def _error(status: int, error: str, headers: dict[str, str] | None = None) -> Answer:
    """An RFC 6749 5.2 error answer."""
    return status, {"error": error}, NO_STORE | (headers or {})

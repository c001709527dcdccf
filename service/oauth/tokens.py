"""OAuth access tokens: RFC 9068 JWTs that the first-party protected path also accepts."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt

from service.ids import new_id
from service.oauth.keys import Key, Keyring


@dataclass(frozen=True, slots=True)
class Family:
    """The grant every token of one authorization shares: its id is the sid claim."""

    grant_id: str
    expires_at: int


def sign_access_token(
    *,
    key: Key,
    issuer: str,
    audience: str,
    subject: str,
    client_id: str,
    scope: str,
    name: str,
    family: Family,
    ttl: int,
) -> tuple[str, int]:
    """Sign an access token; returns it with its lifetime in seconds."""
    now = int(time.time())
    exp = min(now + ttl, family.expires_at)
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "exp": exp,
        "iat": now,
        "nbf": now,
        "jti": new_id(),
        "client_id": client_id,
        "scope": scope,
        "sid": family.grant_id,
        "sxp": family.expires_at,
        # Flask-JWT-Extended refuses tokens without its type claim.
        "type": "access",
        "name": name,
    }
    assert key.private_key is not None, "Keyring.signing_key() gives unsealed keys only"
    token = jwt.encode(
        claims, key.private_key, algorithm=key.alg, headers={"typ": "at+jwt", "kid": key.kid}
    )
    return token, exp - now


def new_refresh_token() -> str:
    """An opaque refresh token with 256 bits of entropy."""
    return secrets.token_urlsafe(32)


def decode_access_token(
    token: str, *, keyring: Keyring, issuer: str, audience: str
) -> dict[str, Any] | None:
    """Verify an OAuth access token's signature, issuer and audience; None if it is not one.

    Expiry is left to the caller: introspection reports expired tokens as inactive.
    """
    try:
        header = jwt.get_unverified_header(token)
        key = keyring.verification_key(str(header.get("kid", "")))
        if key is None or header.get("alg") != key.alg:
            return None
        claims: dict[str, Any] = jwt.decode(
            token,
            key.public_key,
            algorithms=[key.alg],
            issuer=issuer,
            audience=audience,
            options={"verify_exp": False, "require": ["exp", "jti", "sub"]},
        )
    except jwt.PyJWTError:
        return None
    return claims

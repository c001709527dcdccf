"""Flask-JWT-Extended wiring: keys, pinned algorithms, the blocklist loader, 401 bodies."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from datetime import timedelta
from importlib.metadata import version
from types import MethodType
from typing import Any, TypeVar

from flask import Flask, Response, current_app, request
from flask_jwt_extended import JWTManager, view_decorators
from jwt import InvalidTokenError, get_unverified_header

from service import metrics
from service.auth.signing import KID_PREFIX, FirstPartyKeys
from service.auth.verified import Verified, VerifiedTokens
from service.config import Settings
from service.errors import problem, unauthorized
from service.store.blocklist import BlocklistUnavailable, TokenRef, Verdict

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger(__name__)


# What the verified-token memo replaces in Flask-JWT-Extended (pinned exactly).
DECODE_PARAMETERS = ("self", "encoded_token", "csrf_value", "allow_expired")

jwt = JWTManager()


def memo_shapes_differ() -> list[str]:
    """Where Flask-JWT-Extended's internals differ from what the memo replaces (empty: none)."""
    problems = []
    decode = getattr(JWTManager, "_decode_jwt_from_config", None)
    if decode is None or tuple(inspect.signature(decode).parameters) != DECODE_PARAMETERS:
        problems.append(
            "JWTManager._decode_jwt_from_config(encoded_token, csrf_value, allow_expired)"
        )
    if not callable(getattr(view_decorators, "get_unverified_jwt_headers", None)):
        problems.append("view_decorators.get_unverified_jwt_headers")
    return problems


def install_memo() -> bool:
    """Verify each token's signature once (see verified.py); False, with a warning, if unsafe.

    Flask-JWT-Extended parses and verifies a token four times per request. With the memo,
    a token seen again has only its expiry and its key checked again.
    """
    problems = memo_shapes_differ()
    if problems:
        log.warning(
            "verified-token memo NOT applied: Flask-JWT-Extended %s differs: %s; "
            "every token is verified on every request",
            version("flask-jwt-extended"),
            "; ".join(problems),
        )
        return False
    jwt._decode_jwt_from_config = MethodType(_memoized_decode, jwt)  # type: ignore[method-assign]
    # Flask-JWT-Extended parses the header once more right after decoding the token.
    view_decorators.get_unverified_jwt_headers = memoized_header  # type: ignore[attr-defined]
    return True


def _memoized_decode(
    manager: JWTManager, encoded_token: str, csrf_value: Any = None, allow_expired: bool = False
) -> dict[str, Any]:
    decode = JWTManager._decode_jwt_from_config
    memo: VerifiedTokens | None = current_app.extensions.get("verified_tokens")
    if memo is None or csrf_value is not None or allow_expired:
        return dict(decode(manager, encoded_token, csrf_value, allow_expired))
    claims = memo.lookup(encoded_token, manager._decode_key_callback)
    if claims is not None:
        return claims
    claims = dict(decode(manager, encoded_token))
    expires_at = claims.get("exp")
    if isinstance(expires_at, int | float):
        header = get_unverified_header(encoded_token)
        key = manager._decode_key_callback(header, claims)
        memo.remember(encoded_token, Verified(header, dict(claims), key, float(expires_at)))
    return claims


def memoized_header(encoded_token: str) -> dict[str, Any]:
    """The header of a token the memo holds, else parsed as Flask-JWT-Extended does."""
    memo: VerifiedTokens | None = current_app.extensions.get("verified_tokens")
    header = memo.header(encoded_token) if memo is not None else None
    return header if header is not None else get_unverified_header(encoded_token)


def jwt_config(settings: Settings) -> dict[str, Any]:
    """Map settings onto Flask-JWT-Extended's configuration keys."""
    config: dict[str, Any] = {
        "JWT_ALGORITHM": settings.jwt_algorithm,
        # First-party tokens keep their algorithm; OAuth access tokens are ES256 with a kid.
        "JWT_DECODE_ALGORITHMS": sorted({settings.jwt_algorithm, "ES256"}),
        "JWT_TOKEN_LOCATION": ["headers"],
        "JWT_ENCODE_ISSUER": settings.jwt_issuer,
        "JWT_DECODE_ISSUER": settings.jwt_issuer,
        "JWT_ENCODE_AUDIENCE": settings.jwt_audience,
        "JWT_DECODE_AUDIENCE": settings.jwt_audience,
        "JWT_ENCODE_NBF": True,
        "JWT_DECODE_LEEWAY": 0,
        "JWT_ACCESS_TOKEN_EXPIRES": timedelta(seconds=settings.access_token_ttl),
        "JWT_REFRESH_TOKEN_EXPIRES": timedelta(seconds=settings.refresh_token_ttl),
        "JWT_VERIFY_SUB": True,
        "JWT_COOKIE_CSRF_PROTECT": False,
    }
    if settings.jwt_algorithm == "HS256":
        config["JWT_SECRET_KEY"] = settings.jwt_secret
    else:
        assert settings.jwt_private_key_file is not None
        config["JWT_PRIVATE_KEY"] = settings.jwt_private_key_file.read_text()
        public = settings.jwt_public_key_file
        config["JWT_PUBLIC_KEY"] = (
            public.read_text() if public else _public_pem(config["JWT_PRIVATE_KEY"])
        )
    return config


def _public_pem(private_pem: str) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def first_party_keys(settings: Settings, config: dict[str, Any]) -> FirstPartyKeys:
    """The keys of first-party tokens, from the settings and their mapped configuration."""
    if settings.jwt_algorithm == "HS256":
        return FirstPartyKeys.hs256(settings.jwt_secrets)
    earlier = [path.read_text() for path in settings.jwt_public_key_fallbacks]
    return FirstPartyKeys.asymmetric(settings.jwt_algorithm, [config["JWT_PUBLIC_KEY"], *earlier])


def init_app(app: Flask, settings: Settings) -> None:
    """Configure and bind the JWT manager."""
    config = jwt_config(settings)
    app.config.update(config, REVOCATION_CHECK=settings.revocation_check)
    app.extensions["first_party_keys"] = first_party_keys(settings, config)
    wanted = "verified_tokens" in settings.library_change_names
    if wanted and settings.verified_token_memo and install_memo():
        app.extensions["verified_tokens"] = VerifiedTokens(settings.verified_token_memo)
    jwt.init_app(app)


@jwt.token_in_blocklist_loader
def is_revoked(_header: dict[str, Any], claims: dict[str, Any]) -> bool:
    """The one place a request's token is checked for revocation; fails closed (503).

    A verdict kept in memory answers at once; without one, the request waits (suspended)
    for one check in Redis. A view that only revokes the presented token runs even when
    the answer is unknown: revoking it again is harmless, and its durable record must not
    wait for Redis.
    """
    if not current_app.config["REVOCATION_CHECK"]:
        return False
    try:
        verdict = current_app.extensions["store"].verdict(TokenRef.from_claims(claims))
        if verdict is Verdict.NOT_LOADED:
            raise BlocklistUnavailable("blocklist is being rebuilt")
    except BlocklistUnavailable:
        if _revokes_presented_token():
            return False
        raise
    return verdict is Verdict.REVOKED


def revokes_presented_token(view: F) -> F:
    """Mark a view that only revokes its own token: it runs when the blocklist cannot answer."""
    view.revokes_presented_token = True  # type: ignore[attr-defined]
    return view


def _revokes_presented_token() -> bool:
    view = current_app.view_functions.get(request.endpoint or "")
    return bool(getattr(view, "revokes_presented_token", False))


@jwt.additional_headers_loader
def signing_kid(_identity: Any) -> dict[str, str]:
    """Name the key that signs a first-party token, so that the key can change."""
    return {"kid": current_app.extensions["first_party_keys"].kid}


@jwt.token_verification_loader
def note_earlier_key(header: dict[str, Any], _claims: dict[str, Any]) -> bool:
    """Count tokens still signed by a fallback key: once none come, the fallback can go."""
    named = _first_party(header)
    if named is not None and named[0].is_earlier(named[1]):
        metrics.token_under_earlier_key()
    return True


def _first_party(header: dict[str, Any]) -> tuple[FirstPartyKeys, str | None] | None:
    """The first-party keys and the kid, when the header names one of them (or no key)."""
    kid = header.get("kid")
    if kid is not None and not str(kid).startswith(KID_PREFIX):
        return None
    return current_app.extensions["first_party_keys"], None if kid is None else str(kid)


@jwt.decode_key_loader
def decode_key(header: dict[str, Any], _claims: dict[str, Any]) -> Any:
    """Pick the key from the header, and pin the algorithm to that key's.

    A first-party kid (or none, from before tokens carried one) names a first-party key;
    any other kid an OAuth signing key. Any other mix (an HS256 token "signed" with a
    public key, alg none, an unknown kid) is refused here.
    """
    alg, kid = header.get("alg"), header.get("kid")
    named = _first_party(header)
    if named is not None:
        first_party, first_party_kid = named
        key = first_party.verifying_key(first_party_kid)
        if key is None:
            raise InvalidTokenError("unknown signing key")
        if alg != first_party.algorithm:
            raise InvalidTokenError("unexpected algorithm")
        return key
    keyring = current_app.extensions.get("oauth_keyring")
    key = keyring.verification_key(str(kid)) if keyring is not None else None
    if key is None or alg != key.alg:
        raise InvalidTokenError("unknown signing key")
    return key.public_key


def _render(detail: str, error: str | None = "invalid_token") -> Response:
    exc = unauthorized(detail, error)
    return problem(exc.status, exc.detail, headers=exc.headers)


@jwt.unauthorized_loader
def _missing(reason: str) -> Response:
    if reason.startswith("Missing"):
        return _render("A Bearer token is required.", error=None)
    return _render(reason)


@jwt.invalid_token_loader
def _invalid(reason: str) -> Response:
    return _render(f"The token is invalid: {reason}.")


@jwt.expired_token_loader
def _expired(_header: dict[str, Any], _claims: dict[str, Any]) -> Response:
    return _render("The token has expired.")


@jwt.revoked_token_loader
def _revoked(_header: dict[str, Any], _claims: dict[str, Any]) -> Response:
    return _render("The token has been revoked.")

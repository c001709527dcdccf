"""Reference (a): Flask + Flask-JWT-Extended + redis-py blocklist, served by gunicorn gthread.

The common pattern of flask-jwt-extended's blocklist_redis example, with the same API
paths, algorithm, issuer and audience checks as the service. One fixed user, hashed at
start-up with the service's Argon2id parameters, kept in memory. POST /oauth/token
(client_credentials, one in-memory client, ES256 tokens) comes from ref_oauth.py.

    gunicorn --chdir bench -k gthread -w 2 --threads 8 --certfile C --keyfile K ref_flask:app

Environment: REDIS_URL, BENCH_PREFIX, JWT_SECRET, BENCH_USER, BENCH_PASSWORD,
BENCH_CLIENT_ID, BENCH_CLIENT_SECRET, BENCH_NO_CHECK=1 to skip the blocklist lookup (to price it).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import redis
import ref_oauth
from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from flask import Flask, Response, jsonify, request
from flask_jwt_extended import (
    JWTManager,
    create_access_token,
    create_refresh_token,
    get_jwt,
    get_jwt_identity,
    jwt_required,
)

ISSUER = AUDIENCE = "authsvc"
ACCESS_TTL = 900
REFRESH_TTL = 30 * 86400
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

PREFIX = os.environ.get("BENCH_PREFIX", "bench:ref-flask:")
CHECK = os.environ.get("BENCH_NO_CHECK", "") != "1"
USER = os.environ.get("BENCH_USER", "bench-user")
HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
USER_HASH = HASHER.hash(os.environ.get("BENCH_PASSWORD", "bench-password"))

app = Flask(__name__)
app.config.update(
    JWT_SECRET_KEY=os.environ["JWT_SECRET"],
    JWT_ALGORITHM="HS256",
    JWT_DECODE_ALGORITHMS=["HS256"],
    JWT_TOKEN_LOCATION=["headers"],
    JWT_ENCODE_ISSUER=ISSUER,
    JWT_DECODE_ISSUER=ISSUER,
    JWT_ENCODE_AUDIENCE=AUDIENCE,
    JWT_DECODE_AUDIENCE=AUDIENCE,
    JWT_ENCODE_NBF=True,
    JWT_ACCESS_TOKEN_EXPIRES=timedelta(seconds=ACCESS_TTL),
    JWT_REFRESH_TOKEN_EXPIRES=timedelta(seconds=REFRESH_TTL),
)
jwt = JWTManager(app)
blocklist = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))


@jwt.token_in_blocklist_loader
def check_if_token_is_revoked(_header: dict[str, Any], payload: dict[str, Any]) -> bool:
    """One Redis round trip per protected request."""
    return CHECK and blocklist.exists(PREFIX + payload["jti"]) > 0


def _revoke(payload: dict[str, Any]) -> bool:
    """Blocklist the token until it expires; False if it already was (a replay)."""
    ttl = max(1, int(payload["exp"]) - int(time.time()))
    return bool(blocklist.set(PREFIX + payload["jti"], 1, ex=ttl, nx=True))


def _pair(identity: str) -> dict[str, object]:
    """A new access/refresh token pair."""
    claims = {"name": identity}
    return {
        "access_token": create_access_token(identity=identity, additional_claims=claims),
        "refresh_token": create_refresh_token(identity=identity),
        "token_type": "Bearer",
        "expires_in": ACCESS_TTL,
    }


@app.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness probe."""
    return {"status": "ok"}


@app.post("/auth/login")
def login() -> tuple[Response, int, dict[str, str]] | tuple[Response, int]:
    """Exchange credentials for a token pair."""
    body = request.get_json(silent=True) or {}
    try:
        ok = body.get("username") == USER and HASHER.verify(USER_HASH, body.get("password", ""))
    except VerificationError:
        ok = False
    if not ok:
        return jsonify(msg="Bad username or password"), 401
    return jsonify(_pair(USER)), 200, NO_STORE


@app.get("/api/hello")
@jwt_required()
def hello() -> dict[str, str]:
    """The protected resource."""
    return {"message": f"Hello, {get_jwt()['name']}!"}


@app.post("/auth/refresh")
@jwt_required(refresh=True)
def refresh() -> tuple[Response, int, dict[str, str]] | tuple[Response, int]:
    """Rotate: spend the refresh token, return a new pair."""
    if not _revoke(get_jwt()):
        return jsonify(msg="Token has been revoked"), 401
    return jsonify(_pair(get_jwt_identity())), 200, NO_STORE


@app.post("/auth/logout")
@jwt_required()
def logout() -> Response:
    """Revoke the access token."""
    _revoke(get_jwt())
    return Response(status=204)


@app.post("/oauth/token")
def oauth_token() -> tuple[Response, int, dict[str, str]]:
    """OAuth 2.0 token endpoint: client_credentials with HTTP Basic client authentication."""
    status, body, headers = ref_oauth.token(request.headers.get("Authorization"), request.form)
    return jsonify(body), status, headers

"""Reference (b): FastAPI + PyJWT + redis.asyncio blocklist, served by uvicorn.

The same API as the service: HS256, issuer and audience checked, one Redis lookup per
protected request. One fixed user, hashed at start-up with the service's Argon2id
parameters; the hash is verified in the thread pool, off the event loop. POST /oauth/token
(client_credentials, one in-memory client, ES256 tokens) comes from ref_oauth.py.

    uvicorn --app-dir bench --workers 2 --loop uvloop --http httptools \
        --ssl-certfile C --ssl-keyfile K ref_fastapi:app

Environment: REDIS_URL, BENCH_PREFIX, JWT_SECRET, BENCH_USER, BENCH_PASSWORD,
BENCH_CLIENT_ID, BENCH_CLIENT_SECRET.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import parse_qsl

import jwt
import redis.asyncio as aredis
import ref_oauth
from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

ISSUER = AUDIENCE = "authsvc"
ACCESS_TTL = 900
REFRESH_TTL = 30 * 86400
REQUIRED = ["exp", "iat", "nbf", "jti", "sub", "iss", "aud"]
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

SECRET = os.environ["JWT_SECRET"]
PREFIX = os.environ.get("BENCH_PREFIX", "bench:ref-fastapi:")
USER = os.environ.get("BENCH_USER", "bench-user")
HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
USER_HASH = HASHER.hash(os.environ.get("BENCH_PASSWORD", "bench-password"))
UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}

clients: dict[str, aredis.Redis] = {}


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    """One Redis pool per worker process, made on its own loop."""
    clients["redis"] = aredis.Redis.from_url(
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    yield
    await clients.pop("redis").aclose()


app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)


class Credentials(BaseModel):
    """Login body."""

    username: str
    password: str


def _encode(sub: str, token_type: str, ttl: int, **extra: object) -> str:
    """Sign a token with the claims Flask-JWT-Extended would put in."""
    now = int(time.time())
    claims = {"fresh": False, "iat": now, "nbf": now, "jti": str(uuid.uuid4())}
    claims |= {"type": token_type, "sub": sub, "aud": AUDIENCE, "iss": ISSUER, "exp": now + ttl}
    return jwt.encode(claims | extra, SECRET, algorithm="HS256")


def _pair(sub: str) -> dict[str, object]:
    """A new access/refresh token pair."""
    return {
        "access_token": _encode(sub, "access", ACCESS_TTL, name=sub),
        "refresh_token": _encode(sub, "refresh", REFRESH_TTL),
        "token_type": "Bearer",
        "expires_in": ACCESS_TTL,
    }


def _decode(authorization: str | None, token_type: str) -> dict[str, Any]:
    """Verify a Bearer token's signature, claims and type; 401 otherwise."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "Missing Bearer token", headers=UNAUTHORIZED)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            SECRET,
            algorithms=["HS256"],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": REQUIRED},
        )
    except jwt.InvalidTokenError as exc:
        raise HTTPException(401, f"Invalid token: {exc}", headers=UNAUTHORIZED) from None
    if claims.get("type") != token_type:
        raise HTTPException(401, f"Only {token_type} tokens are allowed", headers=UNAUTHORIZED)
    return claims


async def _checked(claims: dict[str, Any]) -> dict[str, Any]:
    """One Redis round trip: refuse revoked tokens."""
    if await clients["redis"].exists(PREFIX + claims["jti"]):
        raise HTTPException(401, "Token has been revoked", headers=UNAUTHORIZED)
    return claims


async def access_claims(authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
    """Dependency: a valid, unrevoked access token."""
    return await _checked(_decode(authorization, "access"))


async def refresh_claims(authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
    """Dependency: a valid, unrevoked refresh token."""
    return await _checked(_decode(authorization, "refresh"))


async def _revoke(claims: dict[str, Any]) -> bool:
    """Blocklist the token until it expires; False if it already was (a replay)."""
    ttl = max(1, int(claims["exp"]) - int(time.time()))
    return bool(await clients["redis"].set(PREFIX + claims["jti"], 1, ex=ttl, nx=True))


def _verify(password: str) -> bool:
    """Check the password against the fixed user's hash."""
    try:
        return HASHER.verify(USER_HASH, password)
    except VerificationError:
        return False


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness probe."""
    return {"status": "ok"}


@app.post("/auth/login")
async def login(body: Credentials, response: Response) -> dict[str, object]:
    """Exchange credentials for a token pair."""
    if body.username != USER or not await run_in_threadpool(_verify, body.password):
        raise HTTPException(401, "Bad username or password")
    response.headers.update(NO_STORE)
    return _pair(USER)


@app.get("/api/hello")
async def hello(claims: Annotated[dict[str, Any], Depends(access_claims)]) -> dict[str, str]:
    """The protected resource."""
    return {"message": f"Hello, {claims['name']}!"}


@app.post("/auth/refresh")
async def refresh(
    claims: Annotated[dict[str, Any], Depends(refresh_claims)], response: Response
) -> dict[str, object]:
    """Rotate: spend the refresh token, return a new pair."""
    if not await _revoke(claims):
        raise HTTPException(401, "Token has been revoked", headers=UNAUTHORIZED)
    response.headers.update(NO_STORE)
    return _pair(claims["sub"])


@app.post("/auth/logout", status_code=204)
async def logout(claims: Annotated[dict[str, Any], Depends(access_claims)]) -> Response:
    """Revoke the access token."""
    await _revoke(claims)
    return Response(status_code=204)


@app.post("/oauth/token")
async def oauth_token(request: Request) -> JSONResponse:
    """OAuth 2.0 token endpoint: client_credentials with HTTP Basic client authentication."""
    form: dict[str, str] = {}
    if request.headers.get("content-type", "").startswith(ref_oauth.FORM):
        raw = (await request.body()).decode(errors="replace")
        form = dict(parse_qsl(raw, keep_blank_values=True))
    status, body, headers = ref_oauth.token(request.headers.get("authorization"), form)
    return JSONResponse(body, status, headers)

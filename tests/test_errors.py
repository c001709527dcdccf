"""Bad input and bad tokens: problem details with the right status, never a stack trace."""

from __future__ import annotations

import time
import uuid

import httpx
import jwt
import pytest

from service.config import Settings
from tests.conftest import Session


def forge(
    settings: Settings, key: str | None = None, alg: str = "HS256", **overrides: object
) -> str:
    """A token shaped like ours, signed with key (or the real secret), with claim overrides."""
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": str(uuid.uuid4()),
        "jti": uuid.uuid4().hex,
        "sid": uuid.uuid4().hex,
        "type": "access",
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "sxp": now + 60,
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "name": "mallory",
        "fresh": False,
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key or str(settings.jwt_secret), algorithm=alg)


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    """Check the problem-details shape and return the body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["status"] == status
    assert {"type", "title", "status"} <= body.keys()
    assert "Traceback" not in response.text
    return body


async def test_unknown_route_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/no/such/thing"), 404)


async def test_wrong_method_is_405_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.get("/auth/login")
    assert_problem(response, 405)
    assert "POST" in response.headers["allow"]


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b'{"username": "abc", "password": ', "application/json", 400),
        (b"username=abc&password=12345678", "application/x-www-form-urlencoded", 415),
        (b'{"username": "abc", "password": "12345678"}', "text/plain", 415),
        (b"", "application/json", 400),
        (b"\xff\xfe\x00", "application/json", 400),
    ],
)
async def test_malformed_bodies(
    client: httpx.AsyncClient, content: bytes, content_type: str, status: int
) -> None:
    response = await client.post(
        "/auth/login", content=content, headers={"content-type": content_type}
    )
    assert_problem(response, status)


async def test_body_too_large_is_413(client: httpx.AsyncClient, settings: Settings) -> None:
    big = b'{"username": "' + b"a" * settings.max_body_bytes + b'"}'
    response = await client.post(
        "/auth/register", content=big, headers={"content-type": "application/json"}
    )
    assert_problem(response, 413)


async def test_missing_token_gets_a_bare_bearer_challenge(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/hello")
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == 'Bearer realm="authsvc"'


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer not.a.jwt", "Basic dXNlcjpwYXNz", "Bearer a.b.c", "Bearer " + "x" * 5000],
)
async def test_malformed_authorization_is_401(client: httpx.AsyncClient, header: str) -> None:
    response = await client.get("/api/hello", headers={"Authorization": header})
    assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith('Bearer realm="authsvc"')


@pytest.mark.parametrize(
    ("case", "overrides"),
    [
        ("expired", {"exp": int(time.time()) - 10}),
        ("not yet valid", {"nbf": int(time.time()) + 3600}),
        ("wrong audience", {"aud": "someone-else"}),
        ("wrong issuer", {"iss": "https://evil.example"}),
        ("no audience", {"aud": None}),
        ("no issuer", {"iss": None}),
        ("refresh as access", {"type": "refresh"}),
    ],
)
async def test_invalid_claims_are_rejected(
    client: httpx.AsyncClient, settings: Settings, case: str, overrides: dict[str, object]
) -> None:
    response = await client.get(
        "/api/hello", headers={"Authorization": f"Bearer {forge(settings, **overrides)}"}
    )
    assert_problem(response, 401)
    assert 'error="invalid_token"' in response.headers["www-authenticate"], case


async def test_forged_signatures_are_rejected(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    wrong_key = forge(settings, key="another-secret-of-sufficient-length-0123456789")
    header, payload, _ = forge(settings).split(".")
    none_alg = jwt.encode({"sub": "x"}, None, algorithm="none")
    tampered = ".".join([header, payload, "AAAA"])
    for token in (wrong_key, none_alg, tampered):
        response = await client.get("/api/hello", headers={"Authorization": f"Bearer {token}"})
        assert_problem(response, 401)


async def test_access_token_cannot_refresh(client: httpx.AsyncClient, user: Session) -> None:
    response = await client.post("/auth/refresh", headers=user.bearer())
    assert_problem(response, 401)


async def test_head_request(client: httpx.AsyncClient) -> None:
    response = await client.head("/healthz")
    assert response.status_code == 200
    assert response.content == b""


async def test_readyz_reports_the_backends_and_the_signing_keys(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "blocklist": "ok", "signing_keys": "ok"}


async def test_deeply_nested_json_is_400(client: httpx.AsyncClient) -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    response = await client.post(
        "/auth/login", content=body, headers={"content-type": "application/json"}
    )
    assert_problem(response, 400)


async def test_chunked_bodies_are_read(client: httpx.AsyncClient) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        yield b'{"username": "chunked_user", '
        yield b'"password": "long enough"}'

    response = await client.post(
        "/auth/register", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code in {201, 409}, response.text

"""First-party auth endpoints, end to end through the served ASGI app and real backends."""

from __future__ import annotations

import asyncio
import time

import httpx
import jwt
import pytest

from service.config import Settings
from tests.conftest import Session, login, register


def decode(token: str) -> dict[str, object]:
    """Claims without verification, to inspect what the service issued."""
    return jwt.decode(token, options={"verify_signature": False})


async def test_register_returns_the_account(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/auth/register", json={"username": "Mixed.Case-user_1", "password": "long enough"}
    )
    assert response.status_code == 201
    body = response.json()
    assert body["username"] == "Mixed.Case-user_1"
    assert len(body["id"]) == 36


async def test_register_duplicate_is_409_case_insensitively(client: httpx.AsyncClient) -> None:
    username = await register(client)
    response = await client.post(
        "/auth/register", json={"username": username.upper(), "password": "another password"}
    )
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 409


@pytest.mark.parametrize(
    "body",
    [
        {"password": "long enough"},
        {"username": "okname"},
        {"username": "ab", "password": "long enough"},
        {"username": "x" * 65, "password": "long enough"},
        {"username": "bad name", "password": "long enough"},
        {"username": "bad/name", "password": "long enough"},
        {"username": "okname", "password": "short"},
        {"username": "okname", "password": "p" * 257},
        {"username": 12345, "password": "long enough"},
        {"username": "okname", "password": None},
        ["okname", "long enough"],
        "just a string",
    ],
)
async def test_register_rejects_invalid_fields(client: httpx.AsyncClient, body: object) -> None:
    response = await client.post("/auth/register", json=body)
    assert response.status_code == 400
    problem = response.json()
    assert problem["title"] == "Bad Request"
    assert problem["type"] == "about:blank"


async def test_login_issues_a_pair_with_all_claims(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    username = await register(client)
    response = await client.post(
        "/auth/login", json={"username": username, "password": "correct horse battery"}
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == settings.access_token_ttl
    access, refresh = decode(body["access_token"]), decode(body["refresh_token"])
    for claims in (access, refresh):
        assert {"sub", "jti", "type", "iat", "nbf", "exp", "iss", "aud", "sid"} <= claims.keys()
        assert claims["iss"] == settings.jwt_issuer
        assert claims["aud"] == settings.jwt_audience
    assert access["type"] == "access" and refresh["type"] == "refresh"
    assert access["sid"] == refresh["sid"]
    assert access["jti"] != refresh["jti"]
    assert access["exp"] - access["iat"] == settings.access_token_ttl  # type: ignore[operator]
    assert refresh["exp"] - refresh["iat"] == settings.refresh_token_ttl  # type: ignore[operator]
    assert access["sxp"] == refresh["exp"]
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "HS256"


async def test_wrong_password_and_unknown_user_look_the_same(client: httpx.AsyncClient) -> None:
    username = await register(client)
    attempts = {"wrong": (username, "wrong password!"), "unknown": ("nobody_here", "whatever123")}
    timings: dict[str, list[float]] = {key: [] for key in attempts}
    bodies = {}
    for _ in range(5):
        for key, (name, password) in attempts.items():
            started = time.perf_counter()
            response = await client.post(
                "/auth/login", json={"username": name, "password": password}
            )
            timings[key].append(time.perf_counter() - started)
            assert response.status_code == 401
            bodies[key] = response.json()
    assert bodies["wrong"] == bodies["unknown"]
    wrong, unknown = sorted(timings["wrong"])[2], sorted(timings["unknown"])[2]
    # Both paths run one Argon2 verification; the medians stay within a factor of two.
    assert 0.5 < wrong / unknown < 2.0, timings


async def test_me_and_hello(client: httpx.AsyncClient, user: Session) -> None:
    me = await client.get("/auth/me", headers=user.bearer())
    assert me.status_code == 200
    assert me.json()["username"] == user.username
    hello = await client.get("/api/hello", headers=user.bearer())
    assert hello.json() == {"message": f"Hello, {user.username}!"}


async def test_refresh_rotates_both_tokens(client: httpx.AsyncClient, user: Session) -> None:
    response = await client.post("/auth/refresh", headers=user.bearer(user.refresh))
    assert response.status_code == 200
    pair = response.json()
    assert pair["refresh_token"] != user.refresh
    assert pair["access_token"] != user.access
    assert decode(pair["access_token"])["sid"] == decode(user.access)["sid"]
    hello = await client.get("/api/hello", headers=user.bearer(pair["access_token"]))
    assert hello.status_code == 200
    again = await client.post("/auth/refresh", headers=user.bearer(pair["refresh_token"]))
    assert again.status_code == 200


async def test_refresh_reuse_revokes_the_whole_session(
    client: httpx.AsyncClient, user: Session
) -> None:
    first = (await client.post("/auth/refresh", headers=user.bearer(user.refresh))).json()
    replay = await client.post("/auth/refresh", headers=user.bearer(user.refresh))
    assert replay.status_code == 401
    assert 'error="invalid_token"' in replay.headers["www-authenticate"]
    for token, path, method in [
        (first["access_token"], "/api/hello", "GET"),
        (first["refresh_token"], "/auth/refresh", "POST"),
        (user.access, "/api/hello", "GET"),
    ]:
        response = await client.request(method, path, headers=user.bearer(token))
        assert response.status_code == 401, (path, response.text)


async def test_concurrent_refreshes_at_most_one_succeeds(
    client: httpx.AsyncClient, user: Session
) -> None:
    responses = await asyncio.gather(
        *(client.post("/auth/refresh", headers=user.bearer(user.refresh)) for _ in range(6))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) <= 1
    assert set(statuses) <= {200, 401}
    winners = [r.json() for r in responses if r.status_code == 200]
    # The losers replayed a spent token, so the winner's tokens die with the session.
    for pair in winners:
        hello = await client.get("/api/hello", headers=user.bearer(pair["access_token"]))
        assert hello.status_code == 401


async def test_logout_revokes_access_and_refresh(client: httpx.AsyncClient, user: Session) -> None:
    response = await client.post("/auth/logout", headers=user.bearer())
    assert response.status_code == 204
    assert response.content == b""
    assert (await client.get("/api/hello", headers=user.bearer())).status_code == 401
    refresh = await client.post("/auth/refresh", headers=user.bearer(user.refresh))
    assert refresh.status_code == 401
    assert (await client.post("/auth/logout", headers=user.bearer())).status_code == 401


async def test_logout_leaves_other_sessions_alone(client: httpx.AsyncClient, user: Session) -> None:
    other = await login(client, user.username, user.password)
    await client.post("/auth/logout", headers=user.bearer())
    assert (await client.get("/api/hello", headers=other.bearer())).status_code == 200


async def test_logout_all_revokes_every_device(client: httpx.AsyncClient, user: Session) -> None:
    laptop = await login(client, user.username, user.password)
    phone = await login(client, user.username, user.password)
    refreshed = (await client.post("/auth/refresh", headers=phone.bearer(phone.refresh))).json()
    assert (await client.post("/auth/logout-all", headers=laptop.bearer())).status_code == 204
    for token in (user.access, laptop.access, refreshed["access_token"]):
        assert (await client.get("/api/hello", headers=user.bearer(token))).status_code == 401
    for token in (user.refresh, laptop.refresh, refreshed["refresh_token"]):
        assert (await client.post("/auth/refresh", headers=user.bearer(token))).status_code == 401
    fresh = await login(client, user.username, user.password)
    assert (await client.get("/api/hello", headers=fresh.bearer())).status_code == 200


async def test_password_change_revokes_everything(client: httpx.AsyncClient, user: Session) -> None:
    wrong = await client.post(
        "/auth/password",
        json={"current_password": "not the password", "new_password": "brand new secret"},
        headers=user.bearer(),
    )
    assert wrong.status_code == 403
    assert (await client.get("/api/hello", headers=user.bearer())).status_code == 200
    changed = await client.post(
        "/auth/password",
        json={"current_password": user.password, "new_password": "brand new secret"},
        headers=user.bearer(),
    )
    assert changed.status_code == 204
    assert (await client.get("/api/hello", headers=user.bearer())).status_code == 401
    assert (
        await client.post("/auth/refresh", headers=user.bearer(user.refresh))
    ).status_code == 401
    old = await client.post(
        "/auth/login", json={"username": user.username, "password": user.password}
    )
    assert old.status_code == 401
    new = await login(client, user.username, "brand new secret")
    assert (await client.get("/api/hello", headers=new.bearer())).status_code == 200

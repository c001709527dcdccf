"""Single-use codes, refresh rotation and replay, revocation, introspection and scopes."""

from __future__ import annotations

import asyncio
import base64
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from service.config import Settings
from service.ids import new_id
from service.loop import WorkerLoop
from service.oauth.clients import Registered, delete_client, purge_expired
from service.oauth.keys import decrypt_key, key_cipher
from service.oauth.models import digest
from service.oauth.tokens import Family, sign_access_token
from service.store import Store
from service.store.db import Database
from service.store.models import utcnow
from service.store.oauth_keys import list_keys
from service.store.oauth_models import OAuthCode
from tests.conftest import Session, login, register
from tests.oauth_helpers import (
    REDIRECT,
    bearer,
    browser,
    claims_of,
    new_client,
    pkce,
    query_of,
    sign_in_and_consent,
)
from tests.proxy import TcpProxy

TOKEN = "/oauth/token"


def auth_of(registered: Registered) -> tuple[str, str]:
    """HTTP basic credentials of a confidential client."""
    return registered.client.client_id, registered.secret or ""


async def issue_code(
    client: httpx.AsyncClient, user: Session, registered: Registered, scope: str = "profile email"
) -> tuple[str, str]:
    """Run the pages; returns (code, verifier)."""
    verifier, challenge = pkce()
    url = "/oauth/authorize?" + str(
        httpx.QueryParams(
            response_type="code",
            client_id=registered.client.client_id,
            redirect_uri=REDIRECT,
            scope=scope,
            code_challenge=challenge,
            code_challenge_method="S256",
        )
    )
    async with browser(client) as agent:
        response = await sign_in_and_consent(agent, url, user.username, user.password)
    return query_of(response)["code"], verifier


async def redeem(
    client: httpx.AsyncClient, registered: Registered, code: str, verifier: str
) -> httpx.Response:
    """Spend a code at the token endpoint."""
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    return await client.post(TOKEN, data=data, auth=auth_of(registered))


async def tokens_for(
    client: httpx.AsyncClient, settings: Settings, user: Session, **options: Any
) -> tuple[Registered, dict[str, Any]]:
    """A new client and a token response for user."""
    registered = await new_client(settings, **options)
    code, verifier = await issue_code(client, user, registered)
    response = await redeem(client, registered, code, verifier)
    assert response.status_code == 200, response.text
    return registered, response.json()


async def refresh(
    client: httpx.AsyncClient,
    registered: Registered,
    refresh_token: str,
    scope: str | None = None,
) -> httpx.Response:
    """Spend a refresh token (asking for scope, if given)."""
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if scope is not None:
        data["scope"] = scope
    return await client.post(TOKEN, data=data, auth=auth_of(registered))


async def status_of(client: httpx.AsyncClient, access_token: str) -> int:
    """Status of the protected sample resource for a token."""
    return (await client.get("/api/hello", headers=bearer(access_token))).status_code


async def test_code_works_once_and_replay_revokes_its_tokens(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    code, verifier = await issue_code(client, user, registered)
    first = await redeem(client, registered, code, verifier)
    assert first.status_code == 200
    tokens = first.json()
    assert await status_of(client, tokens["access_token"]) == 200
    second = await redeem(client, registered, code, verifier)
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"
    assert await status_of(client, tokens["access_token"]) == 401
    assert (await refresh(client, registered, tokens["refresh_token"])).status_code == 400


async def test_concurrent_redemptions_issue_at_most_once(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    code, verifier = await issue_code(client, user, registered)
    responses = await asyncio.gather(
        *(redeem(client, registered, code, verifier) for _ in range(6))
    )
    succeeded = [r for r in responses if r.status_code == 200]
    assert len(succeeded) == 1
    assert all(r.json()["error"] == "invalid_grant" for r in responses if r.status_code != 200)
    # The losers revoked what the winner got.
    tokens = succeeded[0].json()
    assert await status_of(client, tokens["access_token"]) == 401
    assert (await refresh(client, registered, tokens["refresh_token"])).status_code == 400


async def test_code_of_another_client_is_refused(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    owner, thief = await new_client(settings), await new_client(settings)
    code, verifier = await issue_code(client, user, owner)
    stolen = await redeem(client, thief, code, verifier)
    assert stolen.json()["error"] == "invalid_grant"
    assert (await redeem(client, owner, code, verifier)).status_code == 200


async def test_refresh_rotates_and_replay_revokes_the_family(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered, first = await tokens_for(client, settings, user)
    second_response = await refresh(client, registered, first["refresh_token"])
    assert second_response.status_code == 200
    assert second_response.headers["cache-control"] == "no-store"
    second = second_response.json()
    assert second["refresh_token"] != first["refresh_token"]
    third = (await refresh(client, registered, second["refresh_token"])).json()
    assert await status_of(client, third["access_token"]) == 200

    replay = await refresh(client, registered, first["refresh_token"])
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    for token in (first, second, third):
        assert await status_of(client, token["access_token"]) == 401
    assert (await refresh(client, registered, third["refresh_token"])).status_code == 400


async def test_refresh_token_is_bound_to_its_client(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered, tokens = await tokens_for(client, settings, user)
    other = await new_client(settings)
    stolen = await refresh(client, other, tokens["refresh_token"])
    assert stolen.json()["error"] == "invalid_grant"
    assert (await refresh(client, registered, tokens["refresh_token"])).status_code == 200


async def test_refresh_can_narrow_but_not_widen_scope(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    code, verifier = await issue_code(client, user, registered, scope="profile")
    tokens = (await redeem(client, registered, code, verifier)).json()
    wider = await refresh(client, registered, tokens["refresh_token"], scope="profile email")
    assert wider.json()["error"] == "invalid_scope"


async def test_stored_empty_scope_is_never_widened(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    code, verifier = await issue_code(client, user, registered, scope="profile")
    database = Database(settings)
    try:
        async with database.session() as session:
            # A code stored with no scope (as an empty request once produced).
            await session.execute(
                update(OAuthCode).where(OAuthCode.code_hash == digest(code)).values(scope="")
            )
    finally:
        await database.dispose()
    tokens = (await redeem(client, registered, code, verifier)).json()
    assert claims_of(tokens["access_token"])["scope"] == ""
    assert (
        await client.get("/api/profile", headers=bearer(tokens["access_token"]))
    ).status_code == 403
    renewed = (await refresh(client, registered, tokens["refresh_token"])).json()
    assert claims_of(renewed["access_token"])["scope"] == ""
    blank = await refresh(client, registered, renewed["refresh_token"], scope=" ")
    assert blank.json()["error"] == "invalid_scope"


async def test_refused_refresh_leaves_the_token_usable(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    code, verifier = await issue_code(client, user, registered, scope="profile")
    tokens = (await redeem(client, registered, code, verifier)).json()
    for scope in ("profile email", " "):
        refused = await refresh(client, registered, tokens["refresh_token"], scope=scope)
        assert refused.json()["error"] == "invalid_scope", scope
    # Not spent, so not a replay: the grant lives on.
    retried = await refresh(client, registered, tokens["refresh_token"])
    assert retried.status_code == 200, retried.text
    assert await status_of(client, tokens["access_token"]) == 200
    assert await status_of(client, retried.json()["access_token"]) == 200


async def test_refresh_during_a_redis_outage_can_be_retried(
    cut_redis: tuple[httpx.AsyncClient, TcpProxy], settings: Settings
) -> None:
    http, proxy = cut_redis
    password = "correct horse battery"
    user = await login(http, await register(http, password), password)
    registered, tokens = await tokens_for(http, settings, user)
    proxy.stop()
    try:
        failed = await refresh(http, registered, tokens["refresh_token"])
        assert failed.status_code == 503, failed.text
    finally:
        proxy.start()
    retried = failed
    for _ in range(50):
        retried = await refresh(http, registered, tokens["refresh_token"])
        if retried.status_code != 503:
            break
        await asyncio.sleep(0.1)
    assert retried.status_code == 200, retried.text
    assert await status_of(http, retried.json()["access_token"]) == 200


async def revoke(
    client: httpx.AsyncClient, registered: Registered, token: str, hint: str | None = None
) -> httpx.Response:
    """Call the revocation endpoint."""
    data = {"token": token} | ({"token_type_hint": hint} if hint else {})
    return await client.post("/oauth/revoke", data=data, auth=auth_of(registered))


async def introspect(
    client: httpx.AsyncClient, registered: Registered, token: str
) -> dict[str, Any]:
    """Call the introspection endpoint."""
    response = await client.post(
        "/oauth/introspect", data={"token": token}, auth=auth_of(registered)
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_revoking_an_access_token_takes_effect_at_once(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered, tokens = await tokens_for(client, settings, user)
    active = await introspect(client, registered, tokens["access_token"])
    assert active["active"] is True
    assert active["client_id"] == registered.client.client_id
    assert active["jti"] == claims_of(tokens["access_token"])["jti"]
    response = await revoke(client, registered, tokens["access_token"], "access_token")
    assert response.status_code == 200
    assert await status_of(client, tokens["access_token"]) == 401
    assert await introspect(client, registered, tokens["access_token"]) == {"active": False}
    # Only that access token: the refresh token still works.
    assert (await refresh(client, registered, tokens["refresh_token"])).status_code == 200


async def test_revoking_a_refresh_token_kills_the_grant(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered, tokens = await tokens_for(client, settings, user)
    refreshed = await introspect(client, registered, tokens["refresh_token"])
    assert refreshed["active"] is True
    assert refreshed["token_type"] == "refresh_token"
    assert (await revoke(client, registered, tokens["refresh_token"])).status_code == 200
    assert await status_of(client, tokens["access_token"]) == 401
    assert (await refresh(client, registered, tokens["refresh_token"])).status_code == 400
    assert await introspect(client, registered, tokens["refresh_token"]) == {"active": False}
    assert await introspect(client, registered, tokens["access_token"]) == {"active": False}


async def test_spent_refresh_token_is_inactive(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered, tokens = await tokens_for(client, settings, user)
    assert (await refresh(client, registered, tokens["refresh_token"])).status_code == 200
    assert await introspect(client, registered, tokens["refresh_token"]) == {"active": False}


async def test_unknown_tokens(client: httpx.AsyncClient, settings: Settings) -> None:
    registered = await new_client(settings)
    for token in ("not-a-token", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30.x"):
        assert (await revoke(client, registered, token)).status_code == 200
        assert await introspect(client, registered, token) == {"active": False}


async def test_a_client_cannot_revoke_tokens_of_another(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    _owner, tokens = await tokens_for(client, settings, user)
    other = await new_client(settings)
    for token in (tokens["access_token"], tokens["refresh_token"]):
        response = await revoke(client, other, token)
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_grant"
    assert await status_of(client, tokens["access_token"]) == 200


async def test_introspection_requires_client_authentication(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered, tokens = await tokens_for(client, settings, user)
    anonymous = await client.post("/oauth/introspect", data={"token": tokens["access_token"]})
    assert anonymous.status_code == 401
    wrong = await client.post(
        "/oauth/introspect",
        data={"token": tokens["access_token"]},
        auth=(registered.client.client_id, "wrong secret"),
    )
    assert wrong.status_code == 401
    public = await new_client(settings, auth_method="none")
    as_public = await client.post(
        "/oauth/introspect",
        data={"token": tokens["access_token"], "client_id": public.client.client_id},
    )
    assert as_public.status_code == 401


async def test_a_client_introspects_only_its_own_tokens(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    owner, tokens = await tokens_for(client, settings, user)
    other = await new_client(settings)
    api = await new_client(
        settings, grant_types=["client_credentials"], redirect_uris=[], resource_server=True
    )
    assert not other.client.resource_server and api.client.resource_server
    for kind in ("access_token", "refresh_token"):
        assert await introspect(client, other, tokens[kind]) == {"active": False}, kind
        seen_by_api = await introspect(client, api, tokens[kind])
        assert seen_by_api["active"] is True, kind
        assert seen_by_api["client_id"] == owner.client.client_id
        assert (await introspect(client, owner, tokens[kind]))["active"] is True, kind


def basic(raw: bytes) -> dict[str, str]:
    """An Authorization header carrying raw bytes as Basic credentials."""
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


@pytest.mark.parametrize(
    ("method", "path", "form", "headers"),
    [
        ("GET", "/oauth/authorize?response_type=code&client_id=%00x", None, {}),
        ("GET", "/oauth/authorize?response_type=code&client_id=" + "x" * 5000, None, {}),
        ("POST", TOKEN, {"grant_type": "client_credentials", "client_id": "a\x00"}, {}),
        ("POST", TOKEN, {"grant_type": "client_credentials"}, basic(b"\xff\xfe:\xff")),
        ("POST", TOKEN, {"grant_type": "client_credentials"}, basic(b"a\x00:b")),
        ("POST", "/oauth/revoke", {"token": "x", "client_id": "\x00"}, {}),
        ("POST", "/oauth/revoke", {"token": "x"}, basic(b"\xc3(:\xc3(")),
        ("POST", "/oauth/introspect", {"token": "a.b.c"}, basic(b"a\x00:b")),
        ("POST", "/oauth/introspect", {"token": "a.b.c"}, basic(b"\xff:\xff")),
        ("POST", TOKEN, {"grant_type": "client_credentials"}, {"Authorization": b"Basic \xe9="}),
        ("POST", TOKEN, {"grant_type": "client_credentials"}, {"Authorization": "Basic \t"}),
        ("POST", "/oauth/revoke", {"token": "x"}, {"Authorization": "basic "}),
    ],
)
async def test_hostile_client_credentials_are_invalid_client(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    form: dict[str, str] | None,
    headers: dict[str, str | bytes],
) -> None:
    response = await client.request(method, path, data=form, headers=headers)
    assert response.status_code in {400, 401}, response.text
    assert response.json()["error"] == "invalid_client"


async def test_first_party_tokens_are_not_oauth_tokens(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    assert await introspect(client, registered, user.access) == {"active": False}
    assert (await revoke(client, registered, user.access)).status_code == 200
    assert await status_of(client, user.access) == 200


async def test_logout_all_also_ends_oauth_grants(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered, tokens = await tokens_for(client, settings, user)
    response = await client.post("/auth/logout-all", headers=bearer(user.access))
    assert response.status_code == 204
    assert await status_of(client, tokens["access_token"]) == 401
    assert await introspect(client, registered, tokens["refresh_token"]) == {"active": False}
    refused = await refresh(client, registered, tokens["refresh_token"])
    assert refused.json()["error"] == "invalid_grant"


async def test_scope_is_enforced_for_both_kinds_of_token(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    for path in ("/api/profile", "/api/email"):
        assert (await client.get(path, headers=bearer(user.access))).status_code == 200
    registered = await new_client(settings, scope="email")
    code, verifier = await issue_code(client, user, registered, scope="email")
    tokens = (await redeem(client, registered, code, verifier)).json()
    assert tokens["scope"] == "email"
    response = await client.get("/api/profile", headers=bearer(tokens["access_token"]))
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="authsvc", error="insufficient_scope"')
    assert 'scope="profile"' in challenge
    email = await client.get("/api/email", headers=bearer(tokens["access_token"]))
    assert email.status_code == 200
    missing = await client.get("/api/profile")
    assert missing.status_code == 401


async def test_expired_code_is_refused(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    code, verifier = await issue_code(client, user, registered)
    database = Database(settings)
    try:
        async with database.session() as session:
            await session.execute(
                update(OAuthCode)
                .where(OAuthCode.code_hash == digest(code))
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )
    finally:
        await database.dispose()
    response = await redeem(client, registered, code, verifier)
    assert response.json()["error"] == "invalid_grant"


async def test_expired_access_token_is_inactive(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    registered = await new_client(settings)
    database = Database(settings)
    try:
        async with database.session() as session:
            row = (await list_keys(session))[0]
    finally:
        await database.dispose()
    key = decrypt_key(row, key_cipher(str(settings.secret_key)))
    now = int(time.time())
    token, _lifetime = sign_access_token(
        key=key,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        subject="someone",
        client_id=registered.client.client_id,
        scope="profile",
        name="someone",
        family=Family(grant_id=new_id(), expires_at=now - 10),
        ttl=settings.access_token_ttl,
    )
    assert await introspect(client, registered, token) == {"active": False}
    assert await status_of(client, token) == 401
    assert (await revoke(client, registered, token)).status_code == 200


async def test_public_client_revokes_its_own_refresh_token(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings, auth_method="none")
    code, verifier = await issue_code(client, user, registered)
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
        "client_id": registered.client.client_id,
    }
    tokens = (await client.post(TOKEN, data=data)).json()
    response = await client.post(
        "/oauth/revoke",
        data={"token": tokens["refresh_token"], "client_id": registered.client.client_id},
    )
    assert response.status_code == 200
    assert await status_of(client, tokens["access_token"]) == 401


async def test_deleting_a_client_revokes_its_grants(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered, tokens = await tokens_for(client, settings, user)
    assert await status_of(client, tokens["access_token"]) == 200
    store = Store(settings, WorkerLoop())
    try:
        assert await delete_client(store=store, client_id=registered.client.client_id)
        assert not await delete_client(store=store, client_id=registered.client.client_id)
    finally:
        await store.close()
    assert await status_of(client, tokens["access_token"]) == 401
    assert (await refresh(client, registered, tokens["refresh_token"])).json()["error"] in {
        "invalid_client",
        "invalid_grant",
    }


async def test_purge_drops_expired_codes(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    code, _verifier = await issue_code(client, user, registered)
    database = Database(settings)
    try:
        async with database.session() as session:
            await session.execute(
                update(OAuthCode)
                .where(OAuthCode.code_hash == digest(code))
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )
        assert await purge_expired(database=database) >= 1
        async with database.session() as session:
            assert await session.get(OAuthCode, digest(code)) is None
    finally:
        await database.dispose()


async def test_concurrent_refreshes_with_one_token_end_the_family(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered, tokens = await tokens_for(client, settings, user)
    responses = await asyncio.gather(
        *(refresh(client, registered, tokens["refresh_token"]) for _ in range(4))
    )
    assert sum(r.status_code == 200 for r in responses) <= 1
    for response in responses:
        if response.status_code == 200:
            assert await status_of(client, response.json()["access_token"]) == 401
            again = await refresh(client, registered, response.json()["refresh_token"])
            assert again.status_code == 400

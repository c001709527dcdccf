"""OAuth 2.0 flows end to end with Authlib's own client, on the real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from authlib.common.security import generate_token
from authlib.integrations.base_client import OAuthError

from service.config import Settings
from tests.conftest import Session
from tests.oauth_helpers import (
    BASE,
    REDIRECT,
    AsyncOAuth2Client,
    authorize_url,
    bearer,
    browser,
    claims_of,
    csrf_of,
    header_of,
    new_client,
    oauth_client,
    pkce,
    query_of,
    sign_in_and_consent,
)

AUTHORIZE = f"{BASE}/oauth/authorize"
TOKEN = f"{BASE}/oauth/token"


async def authorize(
    client: httpx.AsyncClient, user: Session, oc: AsyncOAuth2Client, **params: str
) -> tuple[str, str]:
    """Run the browser part for Authlib's client; returns (callback URL, code verifier)."""
    verifier = generate_token(48)
    url, _state = oc.create_authorization_url(AUTHORIZE, code_verifier=verifier, **params)
    async with browser(client) as agent:
        response = await sign_in_and_consent(agent, url, user.username, user.password)
    assert response.status_code == 302, response.text
    return response.headers["location"], verifier


async def test_confidential_client_code_flow(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    async with oauth_client(client, registered) as oc:
        callback, verifier = await authorize(client, user, oc)
        token = await oc.fetch_token(TOKEN, authorization_response=callback, code_verifier=verifier)
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] == settings.access_token_ttl
    assert token["scope"] == "profile email"
    header, claims = header_of(token["access_token"]), claims_of(token["access_token"])
    assert header["typ"] == "at+jwt" and header["alg"] == "ES256" and header["kid"]
    assert claims["client_id"] == registered.client.client_id
    assert claims["sub"] == claims_of(user.access)["sub"]
    assert claims["aud"] == settings.jwt_audience and claims["iss"] == settings.jwt_issuer
    assert {"jti", "iat", "nbf", "exp", "sid", "sxp", "scope"} <= claims.keys()
    response = await client.get("/api/profile", headers=bearer(token["access_token"]))
    assert response.status_code == 200, response.text
    assert response.json() == {"sub": claims["sub"], "username": user.username}
    email = await client.get("/api/email", headers=bearer(token["access_token"]))
    assert email.json() == {"sub": claims["sub"], "email": None}
    hello = await client.get("/api/hello", headers=bearer(token["access_token"]))
    assert hello.status_code == 200


async def test_token_responses_are_not_cached(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    async with oauth_client(client, registered) as oc:
        callback, verifier = await authorize(client, user, oc)
        code = query_of(httpx.Response(302, headers={"location": callback}))["code"]
        response = await oc.post(
            TOKEN,
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT,
                "code_verifier": verifier,
            },
            auth=(registered.client.client_id, registered.secret or ""),
        )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    error = await client.post(TOKEN, data={"grant_type": "authorization_code", "code": "x"})
    assert error.status_code in {400, 401}
    assert error.headers["cache-control"] == "no-store"


async def test_public_client_code_flow_and_refresh(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings, auth_method="none", scope="profile")
    assert registered.secret is None
    async with oauth_client(client, registered, scope="profile") as oc:
        callback, verifier = await authorize(client, user, oc)
        token = await oc.fetch_token(TOKEN, authorization_response=callback, code_verifier=verifier)
        assert token["scope"] == "profile"
        renewed = await oc.refresh_token(TOKEN, refresh_token=token["refresh_token"])
    assert renewed["refresh_token"] != token["refresh_token"]
    assert claims_of(renewed["access_token"])["sid"] == claims_of(token["access_token"])["sid"]
    response = await client.get("/api/profile", headers=bearer(renewed["access_token"]))
    assert response.status_code == 200


async def test_client_credentials(client: httpx.AsyncClient, settings: Settings) -> None:
    registered = await new_client(
        settings, grant_types=["client_credentials"], scope="email", redirect_uris=[]
    )
    async with oauth_client(client, registered, scope="email") as oc:
        token = await oc.fetch_token(TOKEN, grant_type="client_credentials")
    assert "refresh_token" not in token
    claims = claims_of(token["access_token"])
    assert claims["sub"] == registered.client.client_id == claims["client_id"]
    assert claims["scope"] == "email"
    email = await client.get("/api/email", headers=bearer(token["access_token"]))
    assert email.status_code == 200
    profile = await client.get("/api/profile", headers=bearer(token["access_token"]))
    assert profile.status_code == 403


async def test_public_client_cannot_use_client_credentials(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    registered = await new_client(settings, auth_method="none")
    response = await client.post(
        TOKEN, data={"grant_type": "client_credentials", "client_id": registered.client.client_id}
    )
    assert response.status_code in {400, 401}
    assert response.json()["error"] in {"invalid_client", "unauthorized_client"}


@pytest.mark.parametrize(
    ("params", "description"),
    [
        ({}, "missing code_challenge"),
        ({"code_challenge_method": "plain"}, "plain"),
        ({"code_challenge_method": ""}, "no method means plain"),
        ({"code_challenge_method": "S512"}, "unknown method"),
        ({"code_challenge": "short", "code_challenge_method": "S256"}, "malformed challenge"),
    ],
)
async def test_authorization_without_s256_pkce_is_refused(
    client: httpx.AsyncClient,
    settings: Settings,
    user: Session,
    params: dict[str, str],
    description: str,
) -> None:
    registered = await new_client(settings)
    if "code_challenge_method" in params and "code_challenge" not in params:
        params = {**params, "code_challenge": pkce()[1]}
    url = authorize_url(registered.client.client_id, **params)
    async with browser(client) as agent:
        response = await sign_in_and_consent(agent, url, user.username, user.password)
    error = query_of(response)
    assert error["error"] == "invalid_request", description
    assert error["state"] == "xyz"
    assert "code" not in error


@pytest.mark.parametrize(
    ("registered_scope", "asked"),
    [
        ("profile email", " "),  # blank after normalisation
        ("profile email", ""),  # no scope parameter at all
        ("profile", "email"),  # only scopes the client is not registered for
    ],
)
async def test_authorization_granting_no_scope_is_refused(
    client: httpx.AsyncClient,
    settings: Settings,
    user: Session,
    registered_scope: str,
    asked: str,
) -> None:
    registered = await new_client(settings, scope=registered_scope)
    client_id = registered.client.client_id
    async with browser(client) as agent:
        # A remembered consent must not turn an empty request into a silent approval.
        approved = authorize_url(client_id, code_challenge=pkce()[1], code_challenge_method="S256")
        assert "code" in query_of(
            await sign_in_and_consent(agent, approved, user.username, user.password)
        )
        empty = authorize_url(
            client_id, scope=asked, code_challenge=pkce()[1], code_challenge_method="S256"
        )
        response = await agent.get(empty)
    error = query_of(response)
    assert error["error"] == "invalid_scope"
    assert error["state"] == "xyz"
    assert "code" not in error


async def test_consent_covers_exactly_the_scopes_granted(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    client_id = registered.client.client_id
    async with browser(client) as agent:
        narrow = authorize_url(client_id, code_challenge=pkce()[1], code_challenge_method="S256")
        assert "code" in query_of(
            await sign_in_and_consent(agent, narrow, user.username, user.password)
        )
        verifier, challenge = pkce()
        wider = authorize_url(
            client_id,
            scope="profile email admin-ish",
            code_challenge=challenge,
            code_challenge_method="S256",
        )
        refused = await agent.get(wider)
        assert query_of(refused)["error"] == "invalid_scope"
        wider = authorize_url(
            client_id, scope="profile email", code_challenge=challenge, code_challenge_method="S256"
        )
        page = await agent.get(wider)
        assert page.status_code == 200  # email was never approved: ask again
        assert "<li>email</li>" in page.text
        approved = await agent.post(
            wider, data={"csrf_token": csrf_of(page), "decision": "approve"}
        )
    code = query_of(approved)["code"]
    response = await client.post(TOKEN, **redeem(registered, code, code_verifier=verifier))
    assert response.json()["scope"] == "profile email"


async def code_for(
    client: httpx.AsyncClient, user: Session, client_id: str, challenge: str, **params: str
) -> str:
    """Get a code through the pages with a hand-built request."""
    url = authorize_url(client_id, code_challenge=challenge, code_challenge_method="S256", **params)
    async with browser(client) as agent:
        response = await sign_in_and_consent(agent, url, user.username, user.password)
    return query_of(response)["code"]


def redeem(registered: Any, code: str, **fields: str) -> dict[str, Any]:
    """Form fields and basic auth of a code redemption."""
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    data.update(fields)
    return {"data": data, "auth": (registered.client.client_id, registered.secret or "")}


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({}, "invalid_request"),  # no verifier
        ({"code_verifier": "a" * 43}, "invalid_grant"),  # wrong verifier
        ({"code_verifier": "short"}, "invalid_request"),  # malformed verifier
    ],
)
async def test_token_request_with_a_bad_verifier_fails(
    client: httpx.AsyncClient,
    settings: Settings,
    user: Session,
    fields: dict[str, str],
    error: str,
) -> None:
    registered = await new_client(settings)
    _verifier, challenge = pkce()
    code = await code_for(client, user, registered.client.client_id, challenge)
    response = await client.post(TOKEN, **redeem(registered, code, **fields))
    assert response.status_code == 400
    assert response.json()["error"] == error


async def test_verifier_without_challenge_gets_no_code(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    url = authorize_url(registered.client.client_id)
    async with browser(client) as agent:
        response = await sign_in_and_consent(agent, url, user.username, user.password)
    assert query_of(response)["error"] == "invalid_request"
    # A code that was never issued cannot be redeemed with a verifier either.
    forged = await client.post(TOKEN, **redeem(registered, "never-issued", code_verifier=pkce()[0]))
    assert forged.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "https://evil.example/callback",
        REDIRECT + "/",
        REDIRECT + "?x=1",
        REDIRECT.upper(),
        "http://client.example/callback",
        # Not echoed into the error's description: there, such characters made a 500.
        REDIRECT + "é",
        REDIRECT + '"',
        REDIRECT + "\\",
    ],
)
async def test_unregistered_redirect_uri_is_refused_without_redirecting(
    client: httpx.AsyncClient, settings: Settings, user: Session, redirect_uri: str
) -> None:
    registered = await new_client(settings)
    url = authorize_url(
        registered.client.client_id,
        redirect_uri=redirect_uri,
        code_challenge=pkce()[1],
        code_challenge_method="S256",
    )
    response = await client.get(url)
    assert response.status_code == 400
    assert "location" not in response.headers
    assert response.json()["error"] == "invalid_request"


async def test_token_request_with_another_redirect_uri_fails(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    other = "https://client.example/other"
    registered = await new_client(settings, redirect_uris=[REDIRECT, other])
    verifier, challenge = pkce()
    code = await code_for(client, user, registered.client.client_id, challenge)
    response = await client.post(
        TOKEN, **redeem(registered, code, redirect_uri=other, code_verifier=verifier)
    )
    assert response.json()["error"] == "invalid_grant"


async def test_implicit_and_password_grants_are_refused(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    response = await client.get(authorize_url(registered.client.client_id, response_type="token"))
    assert query_of(response)["error"] == "unsupported_response_type"
    password = await client.post(
        TOKEN,
        data={"grant_type": "password", "username": user.username, "password": user.password},
        auth=(registered.client.client_id, registered.secret or ""),
    )
    assert password.status_code == 400
    assert password.json()["error"] == "unsupported_grant_type"


@pytest.mark.parametrize("response_type", ["token", "é", 'code"', "code\\", "\x7f", ""])
async def test_unsupported_response_types_are_reported_not_echoed(
    client: httpx.AsyncClient, settings: Settings, response_type: str
) -> None:
    """Reported to the client's redirect URI when it checks out, else as an error page."""
    registered = await new_client(settings)
    known = await client.get(
        authorize_url(registered.client.client_id, response_type=response_type, state="s1")
    )
    assert query_of(known)["error"] == "unsupported_response_type"
    assert query_of(known)["state"] == "s1"
    unknown = await client.get(authorize_url("no-such-client", response_type=response_type))
    assert unknown.status_code == 400
    body = unknown.json()
    assert body["error"] == "unsupported_response_type"
    assert body["error_description"] == "The response_type is not supported; only code is."


async def test_unknown_client_gets_an_error_page_not_a_redirect(client: httpx.AsyncClient) -> None:
    response = await client.get(authorize_url("no-such-client", code_challenge=pkce()[1]))
    assert response.status_code in {400, 401}
    assert "location" not in response.headers


async def test_deny_redirects_with_access_denied(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    url = authorize_url(
        registered.client.client_id, code_challenge=pkce()[1], code_challenge_method="S256"
    )
    async with browser(client) as agent:
        login = await agent.get(url)
        page = await agent.get(login.headers["location"])
        await agent.post(
            "/oauth/login",
            data={
                "csrf_token": csrf_of(page),
                "next": url,
                "username": user.username,
                "password": user.password,
            },
        )
        consent = await agent.get(url)
        assert consent.status_code == 200
        assert registered.client.name in consent.text
        assert consent.headers["x-frame-options"] == "DENY"
        forged = await agent.post(url, data={"csrf_token": "forged", "decision": "approve"})
        assert forged.status_code == 400
        denied = await agent.post(url, data={"csrf_token": csrf_of(consent), "decision": "deny"})
    params = query_of(denied)
    assert params["error"] == "access_denied"
    assert params["state"] == "xyz"
    assert "code" not in params


async def test_login_page_rejects_bad_password_and_missing_csrf(
    client: httpx.AsyncClient, user: Session
) -> None:
    async with browser(client) as agent:
        page = await agent.get("/oauth/login")
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        form = {"csrf_token": csrf_of(page), "username": user.username, "password": "wrong pass"}
        wrong = await agent.post("/oauth/login", data=form)
        assert wrong.status_code == 401
        no_csrf = await agent.post(
            "/oauth/login", data={"username": user.username, "password": user.password}
        )
        assert no_csrf.status_code == 400
        off_site = await agent.post(
            "/oauth/login",
            data={**form, "password": user.password, "next": "https://evil.example/"},
        )
    assert off_site.status_code == 303
    assert off_site.headers["location"] == "/oauth/authorize"


async def test_consent_is_remembered(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    _verifier, challenge = pkce()
    async with browser(client) as agent:
        url = authorize_url(
            registered.client.client_id, code_challenge=challenge, code_challenge_method="S256"
        )
        first = await sign_in_and_consent(agent, url, user.username, user.password)
        assert "code" in query_of(first)
        again = await agent.get(url)
    assert "code" in query_of(again)


async def test_library_client_reports_errors(client: httpx.AsyncClient, settings: Settings) -> None:
    registered = await new_client(settings)
    async with oauth_client(client, registered) as oc:
        with pytest.raises(OAuthError) as raised:
            await oc.fetch_token(TOKEN, code="bogus", code_verifier=generate_token(48))
    assert raised.value.error == "invalid_grant"


async def test_password_change_ends_the_browser_sign_in(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    url = authorize_url(
        registered.client.client_id, code_challenge=pkce()[1], code_challenge_method="S256"
    )
    async with browser(client) as agent:
        first = await sign_in_and_consent(agent, url, user.username, user.password)
        assert "code" in query_of(first)
        changed = await client.post(
            "/auth/password",
            json={"current_password": user.password, "new_password": "a brand new secret"},
            headers=bearer(user.access),
        )
        assert changed.status_code == 204, changed.text
        again = await agent.get(url)
    assert again.status_code == 302
    assert again.headers["location"].startswith("/oauth/login")


async def test_logout_all_ends_the_browser_sign_in(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    client_id = registered.client.client_id
    async with browser(client) as agent:
        first = authorize_url(client_id, code_challenge=pkce()[1], code_challenge_method="S256")
        assert "code" in query_of(
            await sign_in_and_consent(agent, first, user.username, user.password)
        )
        ended = await client.post("/auth/logout-all", headers=bearer(user.access))
        assert ended.status_code == 204, ended.text
        again = authorize_url(client_id, code_challenge=pkce()[1], code_challenge_method="S256")
        refused = await agent.get(again)
        assert refused.status_code == 302
        assert refused.headers["location"].startswith("/oauth/login")
        # Signing in again works, and the remembered consent still applies.
        after = await sign_in_and_consent(agent, again, user.username, user.password)
    assert "code" in query_of(after)


async def test_hostile_sign_in_forms_get_answers_not_errors(
    client: httpx.AsyncClient, user: Session
) -> None:
    async with browser(client) as agent:
        page = await agent.get("/oauth/login")
        csrf = csrf_of(page)
        for username in ("a\x00b", "x" * 5000, "line\r\nbreak"):
            form = {"csrf_token": csrf, "username": username, "password": "whatever"}
            refused = await agent.post("/oauth/login", data=form)
            assert refused.status_code == 401, username[:10]
        for token in ("é", "\x00", csrf + "é"):
            form = {"csrf_token": token, "username": user.username, "password": user.password}
            assert (await agent.post("/oauth/login", data=form)).status_code == 400
        hostile_next = "/oauth/authorize?x=1\r\nSet-Cookie: planted=1"
        signed_in = await agent.post(
            "/oauth/login",
            data={
                "csrf_token": csrf,
                "username": user.username,
                "password": user.password,
                "next": hostile_next,
            },
        )
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/oauth/authorize"
    assert "planted" not in signed_in.headers.get("set-cookie", "")


async def test_concurrent_approvals_merge_into_one_consent(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    client_id = registered.client.client_id
    async with browser(client) as agent:
        url = authorize_url(client_id, code_challenge=pkce()[1], code_challenge_method="S256")
        login = await agent.get(url)
        page = await agent.get(login.headers["location"])
        await agent.post(
            "/oauth/login",
            data={
                "csrf_token": csrf_of(page),
                "username": user.username,
                "password": user.password,
            },
        )
        consent = await agent.get(url)
        form = {"csrf_token": csrf_of(consent), "decision": "approve"}
        clicks = await asyncio.gather(*(agent.post(url, data=form) for _ in range(8)))
        assert all("code" in query_of(click) for click in clicks)
        wider = authorize_url(
            client_id, scope="email", code_challenge=pkce()[1], code_challenge_method="S256"
        )
        asked = await agent.get(wider)
        assert asked.status_code == 200
        await agent.post(wider, data={"csrf_token": csrf_of(asked), "decision": "approve"})
        both = authorize_url(
            client_id,
            scope="email profile",
            code_challenge=pkce()[1],
            code_challenge_method="S256",
        )
        remembered = await agent.get(both)
    assert "code" in query_of(remembered)  # both approvals are on record


async def test_tokens_never_reach_the_logs(
    client: httpx.AsyncClient, settings: Settings, user: Session, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    registered = await new_client(settings)
    async with oauth_client(client, registered) as oc:
        callback, verifier = await authorize(client, user, oc)
        token = await oc.fetch_token(TOKEN, authorization_response=callback, code_verifier=verifier)
        await oc.refresh_token(TOKEN, refresh_token=token["refresh_token"])
    assert caplog.records
    for secret in (token["access_token"], token["refresh_token"], registered.secret or "-"):
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/auth/logout"),
        ("POST", "/auth/logout-all"),
        ("POST", "/auth/password"),
        ("GET", "/auth/me"),
    ],
)
async def test_account_endpoints_refuse_oauth_tokens(
    client: httpx.AsyncClient, settings: Settings, method: str, path: str
) -> None:
    registered = await new_client(
        settings, grant_types=["client_credentials"], scope="email", redirect_uris=[]
    )
    async with oauth_client(client, registered, scope="email") as oc:
        token = await oc.fetch_token(TOKEN, grant_type="client_credentials")
    response = await client.request(
        method,
        path,
        headers=bearer(token["access_token"]),
        json={"current_password": "whatever123", "new_password": "whatever456"},
    )
    assert response.status_code == 403
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]

"""OAuth 2.0 flows end to end with Authlib's own client, on the real PostgreSQL and Redis."""

from __future__ import annotations

import httpx

from service.config import Settings
from tests.conftest import Session
from tests.test_oauth_support import (
    BASE,
    bearer,
    browser,
    claims_of,
    header_of,
    new_client,
    oauth_client,
    sign_in_and_consent,
)

AUTHORIZE = f"{BASE}/oauth/authorize"
TOKEN = f"{BASE}/oauth/token"


async def authorize(
    client: httpx.AsyncClient, user: Session, oc: object, **params: str
) -> tuple[str, str]:
    """Run the browser part for Authlib's client; returns (callback URL, code verifier)."""
    from authlib.common.security import generate_token

    verifier = generate_token(48)
    url, _state = oc.create_authorization_url(AUTHORIZE, code_verifier=verifier, **params)  # type: ignore[attr-defined]
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
    response = await client.get("/api/profile", headers=bearer(token["access_token"]))
    assert response.status_code == 200, response.text
    assert response.json() == {"sub": claims["sub"], "username": user.username}
    hello = await client.get("/api/hello", headers=bearer(token["access_token"]))
    assert hello.status_code == 200

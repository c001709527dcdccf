"""Helpers for the OAuth tests: clients, a scripted browser session, Authlib's own client."""

from __future__ import annotations

import re
import secrets
import warnings
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt
from authlib.deprecate import AuthlibDeprecationWarning
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from service.config import Settings
from service.oauth.clients import Registered, register_client
from service.store.db import Database

with warnings.catch_warnings():
    # Authlib warns that it found httpx rather than httpx2; the client works the same.
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client

BASE = "https://testserver"
REDIRECT = "https://client.example/callback"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')

__all__ = ["AsyncOAuth2Client"]


async def new_client(settings: Settings, **options: Any) -> Registered:
    """Register a client straight in the database (the CLI calls the same function)."""
    options.setdefault("name", f"app-{secrets.token_hex(4)}")
    options.setdefault("redirect_uris", [REDIRECT])
    database = Database(settings)
    try:
        return await register_client(database=database, **options)
    finally:
        await database.dispose()


def oauth_client(
    http: httpx.AsyncClient, registered: Registered, **options: Any
) -> AsyncOAuth2Client:
    """Authlib's httpx client for a registered client, on the in-process app."""
    client = registered.client
    options.setdefault("scope", "profile email")
    options.setdefault("redirect_uri", REDIRECT)
    return AsyncOAuth2Client(
        client_id=client.client_id,
        client_secret=registered.secret,
        token_endpoint_auth_method=client.auth_method,
        revocation_endpoint_auth_method=client.auth_method,
        code_challenge_method="S256",
        transport=http._transport,
        base_url=BASE,
        **options,
    )


def browser(http: httpx.AsyncClient) -> httpx.AsyncClient:
    """A fresh cookie jar on the same app, standing in for a user's browser."""
    return httpx.AsyncClient(transport=http._transport, base_url=BASE)


def csrf_of(page: httpx.Response) -> str:
    """The CSRF token embedded in a login or consent form."""
    match = CSRF.search(page.text)
    assert match, page.text
    return match.group(1)


async def sign_in_and_consent(
    agent: httpx.AsyncClient, authorize_url: str, username: str, password: str
) -> httpx.Response:
    """Walk the pages: authorize -> login -> consent -> Approve; returns the final redirect."""
    response = await agent.get(authorize_url)
    if response.status_code == 302 and "/oauth/login" in response.headers["location"]:
        login_page = await agent.get(response.headers["location"])
        form = {
            "csrf_token": csrf_of(login_page),
            "next": parse_qs(urlsplit(response.headers["location"]).query)["next"][0],
            "username": username,
            "password": password,
        }
        response = await agent.post("/oauth/login", data=form)
        assert response.status_code == 303, response.text
        response = await agent.get(response.headers["location"])
    if response.status_code != 200:
        return response
    return await agent.post(
        authorize_url, data={"csrf_token": csrf_of(response), "decision": "approve"}
    )


def query_of(response: httpx.Response) -> dict[str, str]:
    """The query parameters of a redirect's Location."""
    assert response.status_code == 302, response.text
    return {k: v[0] for k, v in parse_qs(urlsplit(response.headers["location"]).query).items()}


def pkce() -> tuple[str, str]:
    """A code verifier and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    return verifier, create_s256_code_challenge(verifier)


def header_of(token: str) -> dict[str, Any]:
    """The JOSE header of a token."""
    return jwt.get_unverified_header(token)


def claims_of(token: str) -> dict[str, Any]:
    """Unverified claims of a token."""
    return jwt.decode(token, options={"verify_signature": False})


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


def authorize_url(client_id: str, **params: str) -> str:
    """A hand-built authorization request (for the cases a library refuses to build)."""
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT}
    query.update({"scope": "profile", "state": "xyz"}, **params)
    return f"/oauth/authorize?{urlencode({k: v for k, v in query.items() if v})}"


async def authorization_code(
    http: httpx.AsyncClient, client_id: str, username: str, password: str, scope: str = "profile"
) -> tuple[str, str]:
    """Sign in and consent in a browser session for a PKCE code; the code and its verifier."""
    verifier, challenge = pkce()
    url = "/oauth/authorize?" + str(
        httpx.QueryParams(
            response_type="code",
            client_id=client_id,
            redirect_uri=REDIRECT,
            scope=scope,
            code_challenge=challenge,
            code_challenge_method="S256",
        )
    )
    async with browser(http) as agent:
        code = query_of(await sign_in_and_consent(agent, url, username, password))["code"]
    return code, verifier

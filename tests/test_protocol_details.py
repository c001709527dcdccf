"""What a strict client checks: URLs, Bearer's case, parameters, HEAD, headers, TLS groups."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import shutil
import subprocess
from collections.abc import Iterator
from urllib.parse import urlencode

import httpx
import pytest

from service import tls
from service.config import Settings
from tests.browser_helpers import CHROMIUM, CHROMIUM_ARGS, require_browser
from tests.conftest import Session
from tests.oauth_helpers import (
    REDIRECT,
    authorize_url,
    browser,
    claims_of,
    csrf_of,
    new_client,
    pkce,
    sign_in_and_consent,
)
from tests.servers import RunningServer, server_env, start_server

EVIL = {"Host": "evil.example"}
URL_FIELDS = (
    "authorization_endpoint",
    "token_endpoint",
    "revocation_endpoint",
    "introspection_endpoint",
    "jwks_uri",
)


def max_age(response: httpx.Response) -> int:
    """The max-age a response may be cached for (0 when it says nothing)."""
    match = re.search(r"max-age=(\d+)", response.headers.get("cache-control", ""))
    return int(match.group(1)) if match else 0


async def machine(settings: Settings) -> tuple[str, str]:
    """A client_credentials client: (id, secret)."""
    registered = await new_client(
        settings, grant_types=["client_credentials"], redirect_uris=[], scope="profile email"
    )
    return registered.client.client_id, registered.secret or ""


# --- URLs come from the configured issuer, never from the Host header --------------------


async def test_urls_come_from_the_issuer_not_the_host_header(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    response = await client.get("/.well-known/oauth-authorization-server", headers=EVIL)
    assert response.status_code == 200
    meta = response.json()
    assert meta["issuer"] == settings.jwt_issuer
    for field in URL_FIELDS:
        assert meta[field].startswith(f"{settings.jwt_issuer}/"), (field, meta[field])
    assert "evil.example" not in response.text
    assert "public" in response.headers["cache-control"] and max_age(response) > 0
    jwks = await client.get("/.well-known/jwks.json", headers=EVIL)
    assert jwks.status_code == 200 and max_age(jwks) > 0
    # Tokens carry the issuer the metadata names, whatever Host the token request had.
    issued = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=await machine(settings),
        headers=EVIL,
    )
    assert issued.status_code == 200, issued.text
    assert claims_of(issued.json()["access_token"])["iss"] == meta["issuer"]
    # The pages' redirects stay relative: nothing the service sends echoes the Host header.
    registered = await new_client(settings)
    _verifier, challenge = pkce()
    url = authorize_url(
        registered.client.client_id, code_challenge=challenge, code_challenge_method="S256"
    )
    async with browser(client) as agent:
        redirect = await agent.get(url, headers=EVIL)
    assert redirect.status_code == 302
    assert redirect.headers["location"].startswith("/oauth/login?")


# --- The Bearer scheme is case-insensitive (RFC 9110 11.1) --------------------------------


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
@pytest.mark.parametrize("path", ["/api/hello", "/auth/me"])
async def test_first_party_routes_accept_the_scheme_in_any_case(
    client: httpx.AsyncClient, user: Session, scheme: str, path: str
) -> None:
    response = await client.get(path, headers={"Authorization": f"{scheme} {user.access}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("scheme", ["bearer", "BEARER"])
@pytest.mark.parametrize("path", ["/api/profile", "/api/email"])
async def test_oauth_protected_routes_accept_the_scheme_in_any_case(
    client: httpx.AsyncClient, settings: Settings, scheme: str, path: str
) -> None:
    issued = await client.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=await machine(settings)
    )
    token = issued.json()["access_token"]
    response = await client.get(path, headers={"Authorization": f"{scheme} {token}"})
    assert response.status_code == 200, response.text


async def test_a_revoked_token_stays_revoked_in_any_case(
    client: httpx.AsyncClient, user: Session
) -> None:
    # Warm the verified-token memo, so the exact-case spelling is answered from it.
    assert (await client.get("/api/hello", headers=user.bearer())).status_code == 200
    logout = await client.post("/auth/logout", headers={"Authorization": f"BEARER {user.access}"})
    assert logout.status_code == 204
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = await client.get(
            "/api/hello", headers={"Authorization": f"{scheme} {user.access}"}
        )
        assert response.status_code == 401, scheme
        assert "revoked" in response.json()["detail"]


# --- Each parameter at most once (RFC 6749 3.1, 3.2) --------------------------------------


REPEATED = [
    ("/oauth/token", "grant_type=client_credentials&grant_type=client_credentials", ""),
    ("/oauth/token", "grant_type=client_credentials&scope=profile&scope=email", ""),
    ("/oauth/token", "grant_type=client_credentials", "grant_type=client_credentials"),
    ("/oauth/token", "grant_type=client_credentials&scope=email", "scope=profile"),
    ("/oauth/revoke", "token=a&token=b", ""),
    ("/oauth/revoke", "token=a&token_type_hint=x&token_type_hint=y", ""),
    ("/oauth/introspect", "token=a&token=b", ""),
    ("/oauth/introspect", "token=a", "token=b"),
]


@pytest.mark.parametrize(("path", "body", "query"), REPEATED)
async def test_repeated_parameters_are_invalid_requests(
    client: httpx.AsyncClient, settings: Settings, path: str, body: str, query: str
) -> None:
    response = await client.post(
        f"{path}?{query}" if query else path,
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        auth=await machine(settings),
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == "no-store"


async def test_only_the_parameters_the_endpoint_reads_must_not_repeat(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    auth = await machine(settings)
    scopes = {"grant_type": "client_credentials", "scope": ["profile", "profile"]}
    assert (await client.post("/oauth/token", data=scopes, auth=auth)).status_code == 400
    # RFC 6749 3.1: unrecognised parameters are ignored (RFC 8707's resource may repeat).
    unknown = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "resource": ["https://a", "https://b"]},
        auth=auth,
    )
    assert unknown.status_code == 200, unknown.text


async def test_the_authorization_endpoint_refuses_repeats_too(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    _verifier, challenge = pkce()
    url = authorize_url(
        registered.client.client_id, code_challenge=challenge, code_challenge_method="S256"
    )
    async with browser(client) as agent:
        repeated_scope = await agent.get(f"{url}&scope=email")
        assert repeated_scope.status_code == 400
        assert repeated_scope.json()["error"] == "invalid_request"
        # Sign in (approving a first client), then answer another client's consent page.
        first = await sign_in_and_consent(agent, url, user.username, user.password)
        assert first.status_code == 302
        other = await new_client(settings)
        other_url = authorize_url(
            other.client.client_id, code_challenge=challenge, code_challenge_method="S256"
        )
        consent = await agent.get(other_url)
        assert consent.status_code == 200, consent.text
        approve = {"csrf_token": csrf_of(consent), "decision": "approve"}
        both = await agent.post(
            other_url,
            content=urlencode(approve) + "&decision=deny",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert both.status_code == 400, both.text
        assert both.json()["error"] == "invalid_request"
        in_body_too = await agent.post(other_url, data={**approve, "redirect_uri": REDIRECT})
        assert in_body_too.status_code == 400, in_body_too.text
        assert in_body_too.json()["error"] == "invalid_request"


# --- HEAD is GET without the body ---------------------------------------------------------


async def test_head_of_the_login_page_is_its_get_without_a_body(
    client: httpx.AsyncClient,
) -> None:
    async with browser(client) as agent:
        got = await agent.get("/oauth/login?next=/oauth/authorize")
    async with browser(client) as agent:
        head = await agent.head("/oauth/login?next=/oauth/authorize")
    assert got.status_code == head.status_code == 200
    assert head.content == b""
    unstable = {"set-cookie", "date"}
    assert set(got.headers) == set(head.headers)
    assert {k: v for k, v in got.headers.items() if k not in unstable} == {
        k: v for k, v in head.headers.items() if k not in unstable
    }


# --- The pages' security headers ----------------------------------------------------------


def assert_page_headers(page: httpx.Response) -> None:
    """The headers every HTML page carries, the CSP allowing exactly its own style."""
    headers = page.headers
    assert headers["content-type"].startswith("text/html")
    assert "max-age=" in headers["strict-transport-security"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    directives = (part.partition(" ") for part in headers["content-security-policy"].split("; "))
    policy = {name: value for name, _, value in directives}
    assert policy["default-src"] == "'none'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in headers["content-security-policy"]
    styles = re.findall(r"<style>(.*?)</style>", page.text, flags=re.DOTALL)
    assert styles, page.text
    hashes = {
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in styles
    }
    assert set(policy["style-src"].split()) == hashes


async def test_login_and_consent_pages_carry_the_security_headers(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    _verifier, challenge = pkce()
    url = authorize_url(
        registered.client.client_id, code_challenge=challenge, code_challenge_method="S256"
    )
    async with browser(client) as agent:
        redirect = await agent.get(url)
        assert "max-age=" in redirect.headers["strict-transport-security"]
        login_page = await agent.get(redirect.headers["location"])
        assert_page_headers(login_page)
        form = {
            "csrf_token": csrf_of(login_page),
            "next": url,
            "username": user.username,
            "password": user.password,
        }
        failed = await agent.post("/oauth/login", data={**form, "password": "wrong password"})
        assert failed.status_code == 401
        assert_page_headers(failed)
        signed_in = await agent.post("/oauth/login", data=form)
        assert signed_in.status_code == 303
        consent = await agent.get(signed_in.headers["location"])
        assert consent.status_code == 200
        assert_page_headers(consent)


# --- TLS key-exchange groups, on the real server ------------------------------------------


@pytest.fixture(scope="module")
def real_server(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """`python -m service serve` (one worker) over TLS on the test backends."""
    tmp = tmp_path_factory.mktemp("protocol-server")
    running = start_server(server_env(settings, tmp), workers=1, log_dir=tmp)
    try:
        yield running
    finally:
        running.stop()


def handshake(server: RunningServer, *options: str) -> subprocess.CompletedProcess[str]:
    """`openssl s_client` against the server with the given options."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing (Debian: apt-get install openssl)")
    address = server.url.removeprefix("https://")
    return subprocess.run(
        ["openssl", "s_client", "-connect", address, "-brief", *options],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


OPENSSL_NAMES = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1"}


def temp_key(result: subprocess.CompletedProcess[str]) -> str:
    """The key-exchange group of an established handshake, as s_client names it."""
    assert "CONNECTION ESTABLISHED" in result.stderr, result.stderr
    match = re.search(r"Server Temp Key: (?:ECDH, )?([\w-]+)", result.stderr)
    assert match, result.stderr
    return match.group(1)


@pytest.mark.fault
def test_tls_negotiates_only_the_intermediate_groups(real_server: RunningServer) -> None:
    for group, name in OPENSSL_NAMES.items():
        assert temp_key(handshake(real_server, "-tls1_3", "-groups", group)) == name
        # TLS 1.2 also needs the certificate's own curve (P-256) among the client's groups.
        offered = group if group == "P-256" else f"{group}:P-256"
        assert temp_key(handshake(real_server, "-tls1_2", "-groups", offered)) == name
    for group in ("P-521", "X448", "ffdhe2048"):
        only_that = handshake(real_server, "-tls1_3", "-groups", group)
        assert only_that.returncode != 0, group
        assert "CONNECTION ESTABLISHED" not in only_that.stderr, group
        # Offered first, with P-256 after it: the server passes it over.
        offered = f"{group}:P-256"
        assert temp_key(handshake(real_server, "-tls1_3", "-groups", offered)) == "prime256v1"
        if group != "ffdhe2048":  # TLS 1.2 negotiates finite-field groups only for DHE ciphers
            assert temp_key(handshake(real_server, "-tls1_2", "-groups", offered)) == "prime256v1"


@pytest.mark.fault
async def test_the_real_server_answers_head_and_builds_urls_from_the_issuer(
    real_server: RunningServer, settings: Settings
) -> None:
    for http2 in (False, True):
        async with httpx.AsyncClient(base_url=real_server.url, verify=False, http2=http2) as http:
            got = await http.get("/oauth/login")
            head = await http.head("/oauth/login")
            assert head.status_code == got.status_code == 200
            assert head.content == b""
            assert head.headers["content-length"] == got.headers["content-length"]
            meta = await http.get("/.well-known/oauth-authorization-server", headers=EVIL)
            assert meta.json()["token_endpoint"] == f"{settings.jwt_issuer}/oauth/token"


def test_without_libssl_the_groups_stay_default_after_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ssl

    def unavailable(_path: str) -> object:
        raise OSError("no libssl here")

    monkeypatch.setattr(tls, "_libssl", unavailable)
    monkeypatch.setattr(tls, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=tls.__name__):
        first = tls.restrict_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        second = tls.restrict_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    assert first is second is False
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # and the context still works


def test_the_groups_are_set_where_libssl_is_reachable() -> None:
    import ssl

    assert tls.restrict_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)) is True
    assert tls.GROUPS == "X25519:P-256:P-384"


# Adds a style sheet the page does not know and reports the CSP violations it causes.
INJECT_STYLE = """new Promise(done => {
    const seen = [];
    document.addEventListener("securitypolicyviolation", e => seen.push(e.violatedDirective));
    const style = document.createElement("style");
    style.textContent = "body { color: red }";
    document.head.appendChild(style);
    setTimeout(() => done(seen), 200);
})"""


@pytest.mark.fault
def test_a_real_browser_applies_the_pages_own_style_and_reports_no_violation(
    real_server: RunningServer,
) -> None:
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            console: list[str] = []
            page.on("console", lambda message: console.append(message.text))
            page.goto(f"{real_server.url}/oauth/login")
            width = page.evaluate("getComputedStyle(document.body).maxWidth")
            before = list(console)
            violations = page.evaluate(INJECT_STYLE)
        finally:
            browser.close()
    assert width == "448px"  # 28rem, from the page's own style sheet
    assert not [line for line in before if "Content Security Policy" in line], before
    assert violations == ["style-src-elem"]  # while a style it does not know is refused

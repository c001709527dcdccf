"""The login and consent pages in a real headless Chromium, against the real server over TLS."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from service.config import Settings
from service.oauth.clients import Registered
from tests.browser_helpers import CHROMIUM, CHROMIUM_ARGS, require_browser
from tests.oauth_helpers import new_client, pkce
from tests.servers import RunningServer, server_env, start_server

PASSWORD = "correct horse battery"


class Callback:
    """A loopback redirect URI (as a native app would use) that records what it receives."""

    def __init__(self) -> None:
        received: list[str] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/callback"):
                    received.append(self.path)
                self.send_response(200 if self.path.startswith("/callback") else 404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}/callback"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop listening."""
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(settings: Settings, tmp_path: Path) -> Iterator[RunningServer]:
    """`python -m service serve` on a free port, over TLS, on the test databases."""
    env = server_env(settings, tmp_path)
    running = start_server(env, log_dir=tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def callback() -> Iterator[Callback]:
    """The client's redirect endpoint."""
    endpoint = Callback()
    try:
        yield endpoint
    finally:
        endpoint.close()


def test_login_and_consent_in_a_real_browser(
    server: RunningServer, callback: Callback, settings: Settings
) -> None:
    require_browser()
    from playwright.sync_api import sync_playwright

    registered: Registered = asyncio.run(
        new_client(settings, name="Photo Printer", redirect_uris=[callback.uri], scope="profile")
    )
    username = f"browser_{os.urandom(4).hex()}"
    with httpx.Client(base_url=server.url, verify=False) as http:
        created = http.post("/auth/register", json={"username": username, "password": PASSWORD})
        assert created.status_code == 201, created.text

    verifier, challenge = pkce()
    query = {
        "response_type": "code",
        "client_id": registered.client.client_id,
        "redirect_uri": callback.uri,
        "scope": "profile",
        "state": "s-123",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            page.goto(f"{server.url}/oauth/authorize?{urlencode(query)}")
            assert urlsplit(page.url).path == "/oauth/login"
            page.fill("#username", username)
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_selector("text=Authorize Photo Printer")
            assert "profile" in page.inner_text("ul")
            cookies = page.context.cookies()
            session_cookie = next(c for c in cookies if c["name"] == "session")
            assert session_cookie["secure"] and session_cookie["httpOnly"]
            page.click("button[value=approve]")
            page.wait_for_url(f"{callback.uri}**")
        finally:
            browser.close()

    assert len(callback.received) == 1
    params = {k: v[0] for k, v in parse_qs(urlsplit(callback.received[0]).query).items()}
    assert params["state"] == "s-123"
    with httpx.Client(base_url=server.url, verify=False) as http:
        response = http.post(
            "/oauth/token",
            data={
                "grant_type": "authorization_code",
                "code": params["code"],
                "redirect_uri": callback.uri,
                "code_verifier": verifier,
            },
            auth=(registered.client.client_id, registered.secret or ""),
        )
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        profile = http.get("/api/profile", headers={"Authorization": f"Bearer {token}"})
    assert profile.status_code == 200
    assert profile.json()["username"] == username


@pytest.mark.parametrize(
    ("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_missing_browser_fails_in_ci_and_skips_locally(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="apt-get install chromium"):
        require_browser("/nonexistent/chromium")

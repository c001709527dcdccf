"""Schemathesis against the running service (Hypercorn, TLS, PostgreSQL, Redis), from /openapi.json.

Every documented operation gets generated valid and invalid input, with credentials for each
security scheme (a user's tokens, an OAuth client's secret) and browser sessions for the
pages. Every response must be no 5xx and exactly what the document says: status, media
type, headers and body schema. Bounded: a fixed seed and MAX_EXAMPLES cases per operation
and phase: 20 to 40 s on two busy cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from service.api_doc.paths import PATHS
from service.config import Settings
from service.store.migrate import upgrade
from tests.conftest import delete_prefix, fresh_database, make_settings
from tests.oauth_helpers import REDIRECT, csrf_of, new_client, pkce
from tests.servers import RunningServer, server_env, start_server

MAX_EXAMPLES = 25
SEED = 20261202
RUN_TIMEOUT = 150
PASSWORD = "correct horse battery"
# Generated sign-ins fail by the hundred: counted, they would lock the test user out.
UNTHROTTLED = {
    name: "1000000"
    for name in (
        "LOGIN_FAILURES_PER_PAIR",
        "LOGIN_FAILURES_PER_ACCOUNT",
        "LOGIN_FAILURES_PER_ADDRESS",
        "CLIENT_FAILURES_PER_CLIENT",
        "CLIENT_FAILURES_PER_ADDRESS",
    )
}
# Valid requests to these must have been answered 2xx or 3xx at least once: the credentials
# given to Schemathesis took them past authentication.
AUTHENTICATED = (
    "POST /auth/refresh",
    "POST /auth/logout",
    "POST /auth/logout-all",
    "GET /auth/me",
    "GET /api/hello",
    "GET /api/profile",
    "GET /api/email",
    "GET /oauth/authorize",
    "POST /oauth/token",
    "POST /oauth/revoke",
    "POST /oauth/introspect",
)
# The coverage phase does not apply configured body values: its forms carry no CSRF token.
COVERAGE_WITHOUT_CSRF = {"coverage": {"checks": {"positive_data_acceptance": {"enabled": False}}}}
# RFC 6749 4.1.2.1: once client and redirect URI check out, an invalid authorization request
# is answered by redirecting to the client with an error (302), not with a 4xx.
ERRORS_BY_REDIRECT = {"negative_data_rejection": {"enabled": False}}


@pytest.fixture
def own_settings(postgres_server: str, redis_server: str, tmp_path: Path) -> Iterator[Settings]:
    """A database and Redis prefix of this test's own.

    The generated sign-ins fail by the hundred from 127.0.0.1: counted under the shared
    prefix, they would throttle every later test's logins.
    """
    prefix = f"authsvc-test:{uuid.uuid4().hex[:12]}:"
    with fresh_database(postgres_server) as url:
        own = make_settings(tmp_path, database_url=url, redis_url=redis_server, redis_prefix=prefix)
        upgrade(own)
        try:
            yield own
        finally:
            delete_prefix(redis_server, prefix)


@pytest.fixture
def server(own_settings: Settings, tmp_path: Path) -> Iterator[RunningServer]:
    """One worker of the real server on this test's databases."""
    env = {**server_env(own_settings, tmp_path), **UNTHROTTLED}
    running = start_server(env, log_dir=tmp_path)
    try:
        yield running
    finally:
        running.stop()


def toml_value(value: object) -> str:
    """A TOML value: JSON's strings, numbers and booleans are TOML's too."""
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(key)} = {toml_value(item)}" for key, item in value.items())
        return "{ " + items + " }"
    return json.dumps(value)


def toml_table(header: str, values: dict[str, Any]) -> str:
    """One TOML table (or array-of-tables entry)."""
    return f"{header}\n" + "".join(f"{key} = {toml_value(v)}\n" for key, v in values.items())


async def browser_session(http: httpx.AsyncClient, username: str | None = None) -> tuple[str, str]:
    """A browser's session cookie and its CSRF token; signed in as username if given."""
    http.cookies.clear()
    csrf = csrf_of(await http.get("/oauth/login"))
    if username is not None:
        form = {"csrf_token": csrf, "username": username, "password": PASSWORD}
        signed_in = await http.post("/oauth/login", data=form)
        assert signed_in.status_code == 303, signed_in.text
    return f"session={http.cookies['session']}", csrf


async def schemathesis_config(settings: Settings, http: httpx.AsyncClient) -> str:
    """Credentials for every security scheme and page, and the checks each operation gets."""
    username = f"st_{uuid.uuid4().hex[:12]}"
    registered = await http.post(
        "/auth/register", json={"username": username, "password": PASSWORD}
    )
    assert registered.status_code == 201, registered.text
    client = await new_client(
        settings,
        grant_types=["authorization_code", "refresh_token", "client_credentials"],
        resource_server=True,
    )
    login = {"username": username, "password": PASSWORD}
    page_cookie, page_csrf = await browser_session(http)
    user_cookie, _ = await browser_session(http, username)
    authorize = {
        "client_id": client.client.client_id,
        "redirect_uri": REDIRECT,
        "code_challenge": pkce()[1],
    }
    query = urlencode(
        {**authorize, "response_type": "code", "code_challenge_method": "S256", "scope": "profile"}
    )
    consent = await http.get(f"/oauth/authorize?{query}", headers={"Cookie": user_cookie})
    assert consent.status_code == 200, consent.text
    parts = [
        toml_table("", {"tls-verify": False, "max-redirects": 0, "request-timeout": 10}),
        toml_table("[generation]", {"database": "none"}),
        toml_table(
            "[auth.openapi.clientBasic]",
            {"username": client.client.client_id, "password": client.secret},
        ),
        # Fetched again whenever refused: logout, logout-all and refresh spend them.
        toml_table(
            "[auth.dynamic.openapi.bearerAuth]",
            {"path": "/auth/login", "payload": login, "extract_selector": "/access_token"},
        ),
        toml_table(
            "[auth.dynamic.openapi.refreshToken]",
            {"path": "/auth/login", "payload": login, "extract_selector": "/refresh_token"},
        ),
        toml_table(
            "[[operations]]",
            {
                "include-path": "/oauth/authorize",
                "headers": {"Cookie": user_cookie},
                "parameters": {
                    **{f"query.{name}": value for name, value in authorize.items()},
                    "body.csrf_token": csrf_of(consent),
                },
                "checks": ERRORS_BY_REDIRECT,
                "phases": COVERAGE_WITHOUT_CSRF,
            },
        ),
        toml_table(
            "[[operations]]",
            {
                "include-path": "/oauth/login",
                "include-method": "POST",
                "headers": {"Cookie": page_cookie},
                "parameters": {"body.csrf_token": page_csrf},
                "phases": COVERAGE_WITHOUT_CSRF,
            },
        ),
    ]
    return "\n".join(parts)


async def test_the_service_answers_as_its_document_says(
    server: RunningServer, own_settings: Settings, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=False) as http:
        config = await schemathesis_config(own_settings, http)
        served = await http.get("/openapi.json")
    (tmp_path / "schemathesis.toml").write_text(config)
    # From a file: loaded from its URL, Schemathesis leaves out the operation serving it.
    (tmp_path / "openapi.json").write_bytes(served.content)
    report = tmp_path / "report.json"
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", "schemathesis.toml"),
        *("run", "openapi.json", "--url", server.url),
        *("--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "2"),
        *("--report", "json", "--report-json-path", str(report)),
    ]
    run = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-15000:] + "\nserver log:\n" + server.log()[-4000:]
    summary = json.loads(report.read_text())
    documented = sum(len(methods) for methods in PATHS.values())
    assert summary["operations"]["tested"] == documented, output[-4000:]
    assert summary["failures"] == [] and summary["errors"] == [], output[-4000:]
    accepted = {
        label: sum(rate["accepted"] for rate in phases.values())
        for label, phases in summary["valid_rates"].items()
    }
    refused = [label for label in AUTHENTICATED if not accepted.get(label)]
    assert not refused, f"never past authentication: {refused}\n{output[-4000:]}"
    assert "unhandled error" not in server.log(), server.log()[-4000:]
    print(output[output.rfind("SUMMARY") :])

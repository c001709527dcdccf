"""A small blocking HTTPS client for set-up and checks (the load comes from wrk and h2load)."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import jwt

USERNAME = "bench-user"
PASSWORD = "bench-password-0123"
LOGIN_BODY = json.dumps({"username": USERNAME, "password": PASSWORD})
OAUTH_SCOPE = "email"
OAUTH_BODY = urlencode({"grant_type": "client_credentials", "scope": OAUTH_SCOPE})
FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Pair:
    """An access token and the refresh token of the same login."""

    access: str
    refresh: str


@dataclass(frozen=True)
class OAuthClient:
    """A confidential OAuth client: its id and its secret in clear."""

    client_id: str
    secret: str

    @property
    def basic(self) -> str:
        """Authorization header value for client_secret_basic (RFC 6749 2.3.1)."""
        raw = f"{quote(self.client_id, safe='')}:{quote(self.secret, safe='')}"
        return "Basic " + base64.b64encode(raw.encode()).decode()


def tls_context(cert: Path) -> ssl.SSLContext:
    """Trust exactly the run's self-signed certificate."""
    return ssl.create_default_context(cafile=str(cert))


def connect(port: int, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    """A new connection to 127.0.0.1:port, handshake done."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    conn.connect()
    return conn


def call(
    conn: http.client.HTTPSConnection,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: str | None = None,
) -> tuple[int, bytes]:
    """One request on an open connection; returns (status, body)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def register(port: int, context: ssl.SSLContext) -> None:
    """Create the benchmark account on our service (201, or 409 if it exists)."""
    conn = connect(port, context)
    try:
        status, body = call(conn, "POST", "/auth/register", body=LOGIN_BODY)
    finally:
        conn.close()
    if status not in (201, 409):
        raise RuntimeError(f"register failed: {status} {body[:200]!r}")


def login(port: int, context: ssl.SSLContext) -> Pair:
    """Sign in once and return the token pair."""
    conn = connect(port, context)
    try:
        status, body = call(conn, "POST", "/auth/login", body=LOGIN_BODY)
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"login failed: {status} {body[:200]!r}")
    data = json.loads(body)
    return Pair(data["access_token"], data["refresh_token"])


def smoke(port: int, context: ssl.SSLContext, pair: Pair) -> None:
    """The protected GET must answer 200 before anything is measured."""
    conn = connect(port, context)
    try:
        status, body = call(conn, "GET", "/api/hello", token=pair.access)
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"GET /api/hello answered {status}: {body[:300]!r}")


def client_credentials(port: int, context: ssl.SSLContext, oauth: OAuthClient) -> None:
    """One client_credentials token request must give an ES256 access token for the client."""
    conn = connect(port, context)
    try:
        headers = {"Authorization": oauth.basic, "Content-Type": FORM}
        conn.request("POST", "/oauth/token", body=OAUTH_BODY, headers=headers)
        response = conn.getresponse()
        status, body = response.status, response.read()
        cache = response.getheader("Cache-Control", "")
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"client_credentials answered {status}: {body[:300]!r}")
    data = json.loads(body)
    token = data.get("access_token", "")
    claims = jwt.decode(token, options={"verify_signature": False})
    ok = (
        data.get("token_type") == "Bearer"
        and data.get("scope") == OAUTH_SCOPE
        and "no-store" in cache
        and jwt.get_unverified_header(token).get("alg") == "ES256"
        and claims.get("sub") == claims.get("client_id") == oauth.client_id
        and claims.get("scope") == OAUTH_SCOPE
    )
    if not ok:
        raise RuntimeError(f"client_credentials: unexpected answer {data} ({claims})")


def read_pairs(out: Path) -> list[Pair]:
    """The token pairs a login.lua run wrote (one file per wrk thread), removing the files."""
    pairs = []
    for path in sorted(out.parent.glob(out.name + "*.txt")):
        for line in path.read_text().splitlines():
            access, _, refresh = line.partition("\t")
            if refresh:
                pairs.append(Pair(access, refresh))
        path.unlink()
    return pairs

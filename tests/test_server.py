"""The real thing: Hypercorn with two worker processes, TLS, HTTP/2 and HTTP/1.1."""

from __future__ import annotations

import contextlib
import socket
import ssl
import uuid
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from service.config import Settings
from tests.servers import RunningServer, server_env, start_server

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def server(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Two Hypercorn workers over TLS; stopping them must be graceful."""
    tmp = tmp_path_factory.mktemp("server")
    running = start_server(server_env(settings, tmp), workers=2, log_dir=tmp)
    yield running
    assert running.stop() == 0, running.log()
    assert "Traceback" not in running.log(), running.log()


def connect(server: RunningServer, http2: bool = True) -> httpx.Client:
    """A new connection (hence possibly another worker)."""
    return httpx.Client(base_url=server.url, verify=False, http2=http2, http1=not http2)


def worker_of(http: httpx.Client) -> int:
    """The pid of the worker that owns this client's connection."""
    return int(http.get("/healthz").json()["worker"])


def sign_in(server: RunningServer) -> dict[str, str]:
    """Register and log in a new user over HTTP/2; returns the token pair."""
    username = f"srv_{uuid.uuid4().hex[:10]}"
    with connect(server) as http:
        body = {"username": username, "password": PASSWORD}
        assert http.post("/auth/register", json=body).status_code == 201
        response = http.post("/auth/login", json=body)
        assert response.status_code == 200
        tokens: dict[str, str] = response.json()
        return tokens


def statuses_per_worker(
    server: RunningServer, method: str, path: str, token: str
) -> dict[int, set[int]]:
    """Call path on fresh connections until both workers answered; status codes by worker."""
    seen: dict[int, set[int]] = {}
    for _ in range(80):
        with connect(server) as http:
            pid = worker_of(http)
            response = http.request(method, path, headers={"Authorization": f"Bearer {token}"})
            seen.setdefault(pid, set()).add(response.status_code)
        if len(seen) == 2 and sum(len(codes) for codes in seen.values()) >= 2:
            break
    assert len(seen) == 2, f"only reached workers {list(seen)}"
    return seen


def test_alpn_offers_http2_and_http11(server: RunningServer) -> None:
    with connect(server, http2=True) as http:
        assert http.get("/healthz").http_version == "HTTP/2"
    with connect(server, http2=False) as http:
        assert http.get("/healthz").http_version == "HTTP/1.1"


def test_logout_is_refused_by_every_worker_at_once(server: RunningServer) -> None:
    tokens = sign_in(server)
    before = statuses_per_worker(server, "GET", "/api/hello", tokens["access_token"])
    assert all(codes == {200} for codes in before.values())
    with connect(server) as http:
        response = http.post(
            "/auth/logout", headers={"Authorization": f"Bearer {tokens['access_token']}"}
        )
        assert response.status_code == 204
        assert response.content == b""
    after = statuses_per_worker(server, "GET", "/api/hello", tokens["access_token"])
    assert all(codes == {401} for codes in after.values()), after
    refresh = statuses_per_worker(server, "POST", "/auth/refresh", tokens["refresh_token"])
    assert all(codes == {401} for codes in refresh.values()), refresh


def test_logout_all_is_refused_by_every_worker(server: RunningServer) -> None:
    first = sign_in(server)
    with connect(server) as http:
        me = http.get("/auth/me", headers={"Authorization": f"Bearer {first['access_token']}"})
        username = me.json()["username"]
        second = http.post("/auth/login", json={"username": username, "password": PASSWORD}).json()
        response = http.post(
            "/auth/logout-all", headers={"Authorization": f"Bearer {second['access_token']}"}
        )
        assert response.status_code == 204
    for token in (first["access_token"], second["access_token"]):
        after = statuses_per_worker(server, "GET", "/api/hello", token)
        assert all(codes == {401} for codes in after.values()), after


def test_head_and_204_through_the_real_server(server: RunningServer) -> None:
    with connect(server) as http:
        head = http.head("/healthz")
        assert head.status_code == 200
        assert head.content == b""
    with connect(server, http2=False) as http:
        head = http.head("/healthz")
        assert head.status_code == 200


@pytest.mark.parametrize("http2", [True, False])
def test_bad_input_gets_problem_details(server: RunningServer, http2: bool) -> None:
    with connect(server, http2=http2) as http:
        malformed = http.post(
            "/auth/login", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert malformed.status_code == 400
        assert malformed.headers["content-type"] == "application/problem+json"
        too_big = http.post(
            "/auth/login",
            content=b"x" * (2 * 1024 * 1024),
            headers={"content-type": "application/json"},
        )
        assert too_big.status_code == 413
        assert too_big.json()["status"] == 413


def test_survives_aborted_http2_streams(server: RunningServer) -> None:
    pids_before = _all_worker_pids(server)
    for _ in range(6):
        _abort_streams(server)
    with connect(server) as http:
        assert http.get("/healthz").status_code == 200
    assert _all_worker_pids(server) == pids_before


def _all_worker_pids(server: RunningServer) -> set[int]:
    pids: set[int] = set()
    for _ in range(60):
        with connect(server) as http:
            pids.add(worker_of(http))
        if len(pids) == 2:
            break
    return pids


def _abort_streams(server: RunningServer) -> None:
    """Open streams, reset some mid-request, then drop the connection without goodbye."""
    host, port = server.url.removeprefix("https://").split(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for index in range(10):
            stream = conn.get_next_available_stream_id()
            headers = [
                (":method", "POST"),
                (":path", "/auth/login"),
                (":scheme", "https"),
                (":authority", f"{host}:{port}"),
                ("content-type", "application/json"),
                ("content-length", "1000"),
            ]
            conn.send_headers(stream, headers)
            conn.send_data(stream, b'{"username": "x')
            if index % 2:
                conn.reset_stream(stream)
        tls.sendall(conn.data_to_send())
        tls.settimeout(0.5)
        with contextlib.suppress(TimeoutError, ssl.SSLError):
            tls.recv(65536)

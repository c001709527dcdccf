"""A stop (SIGTERM): new connections refused at once, requests in flight finished, idle ones cut."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from service.config import Settings
from tests.servers import RunningServer, server_env, start_server, wait_until_listening

PASSWORD = "correct horse battery"


@pytest.mark.fault
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_refuses_new_connections_and_finishes_the_one_in_flight(
    settings: Settings, tmp_path: Path, workers: int
) -> None:
    server = start_server(server_env(settings, tmp_path), workers=workers, log_dir=tmp_path)
    try:
        wait_until_listening(server, workers)
        body = json.dumps({"username": _register(server), "password": PASSWORD}).encode()
        with _tls_connection(server) as in_flight:
            half = len(body) // 2
            in_flight.sendall(_login_head(server, len(body)) + body[:half])
            time.sleep(0.2)  # the worker has the request head and waits for the body
            os.kill(server.process.pid, signal.SIGTERM)  # the master only, as a supervisor does
            took = _seconds_until_refused(server)
            assert took < 5, f"new connections still accepted {took:.1f} s after SIGTERM"
            in_flight.sendall(body[half:])
            status_line, answer = _read_response(in_flight)
        assert status_line.startswith(b"HTTP/1.1 200"), status_line
        assert "access_token" in json.loads(answer)
        assert server.process.wait(30) == 0, server.log()
        assert "Traceback" not in server.log(), server.log()
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.stop()


@pytest.mark.fault
@pytest.mark.parametrize(
    "setup",
    [
        {"LIBRARY_CHANGES": "all"},
        {"LIBRARY_CHANGES": "none"},
        {"LIBRARY_CHANGES": "all", "H2_ABUSE_PENALTY": "0"},  # the loop's own accept
    ],
    ids=["all-changes", "no-changes", "no-penalty-box"],
)
def test_sigterm_does_not_wait_for_idle_keep_alive_connections(
    settings: Settings, tmp_path: Path, setup: dict[str, str]
) -> None:
    # Clients that keep idle connections without reading them never answer the server's
    # TLS close; a stop used to wait 30 s for them (service/stopping.py).
    env = server_env(settings, tmp_path) | setup
    server = start_server(env, workers=1, log_dir=tmp_path)
    idle: list[ssl.SSLSocket] = []
    try:
        idle += [_idle_http1(server), _idle_http2(server)]
        started = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)  # the master only, as a supervisor does
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 20 s after SIGTERM:\n{server.log()}")
        took = time.monotonic() - started
        assert took < 5, f"the stop took {took:.1f} s with idle keep-alive connections open"
        assert server.process.returncode == 0, server.log()
        for conn in idle:  # each was closed by the server
            conn.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert conn.recv(65536) == b""
        assert "Traceback" not in server.log(), server.log()
    finally:
        for conn in idle:
            conn.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.stop()


def _idle_http1(server: RunningServer) -> ssl.SSLSocket:
    """An HTTP/1.1 connection left idle after one response, read whole."""
    conn = _tls_connection(server)
    host, port = _address(server)
    conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    status_line, _ = _read_response(conn)
    assert status_line.startswith(b"HTTP/1.1 200"), status_line
    return conn


def _idle_http2(server: RunningServer) -> ssl.SSLSocket:
    """An HTTP/2 connection left idle after one response, read whole."""
    conn = _tls_connection(server, "h2")
    assert conn.selected_alpn_protocol() == "h2"
    host, port = _address(server)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    request = [(":method", "GET"), (":scheme", "https"), (":path", "/healthz")]
    connection.send_headers(1, [*request, (":authority", f"{host}:{port}")], end_stream=True)
    conn.sendall(connection.data_to_send())
    ended = False
    while not ended:
        data = conn.recv(65536)
        assert data, "connection closed before the response"
        events = connection.receive_data(data)
        ended = any(isinstance(event, h2.events.StreamEnded) for event in events)
        conn.sendall(connection.data_to_send())
    return conn


def _register(server: RunningServer) -> str:
    username = f"stop_{uuid.uuid4().hex[:10]}"
    with httpx.Client(base_url=server.url, verify=False) as http:
        body = {"username": username, "password": PASSWORD}
        assert http.post("/auth/register", json=body).status_code == 201
    return username


def _address(server: RunningServer) -> tuple[str, int]:
    parts = urlsplit(server.url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def _tls_connection(server: RunningServer, alpn: str = "http/1.1") -> ssl.SSLSocket:
    """A connection over TLS (HTTP/1.1 unless alpn says), certificate unchecked (a test one)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([alpn])
    host, port = _address(server)
    raw = socket.create_connection((host, port), timeout=10)
    return context.wrap_socket(raw, server_hostname=host)


def _login_head(server: RunningServer, length: int) -> bytes:
    host, port = _address(server)
    return (
        f"POST /auth/login HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _seconds_until_refused(server: RunningServer, limit: float = 10.0) -> float:
    """Connect again and again until the address refuses; how long that took."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            with socket.create_connection(_address(server), timeout=1):
                pass
        except ConnectionRefusedError:
            return time.monotonic() - start
        except TimeoutError:
            pass
        time.sleep(0.05)
    return limit


def _read_response(conn: ssl.SSLSocket) -> tuple[bytes, bytes]:
    """The status line and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    headers = dict(line.split(b":", 1) for line in lines[1:])
    length = int({k.strip().lower(): v for k, v in headers.items()}[b"content-length"])
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return lines[0], body

"""Behind an ingress: plain HTTP/1.1 and h2c on PROXY_BIND, X-Forwarded-* from trusted peers."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from service.addresses import (
    MAX_HOPS,
    MEMO_ENTRIES,
    MEMO_TEXT_CHARS,
    TrustedProxies,
    forwarded_client,
    parse_address,
)
from service.config import ConfigError, Environment, Settings, load_settings
from service.forwarded import ForwardedHeaders
from service.server import hypercorn_config
from tests.conftest import make_settings
from tests.servers import (
    ROOT,
    RunningServer,
    free_port,
    launch_server,
    server_env,
    start_server,
    wait_until_listening,
)

PASSWORD = "correct horse battery"
WRONG = "not the password"
INGRESS = "127.0.0.2"  # the trusted proxy's address (any 127.x.y.z reaches 127.0.0.1)
STRANGER = "127.0.0.3"  # a peer on the private port that is not a proxy
WORKERS = 2


def _healthcheck_module() -> Any:
    """docker/healthcheck.py, a script outside the package."""
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "docker" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthz_url = _healthcheck_module().healthz_url


# --- the walk along X-Forwarded-For ------------------------------------------------------


def _trusted(*networks: str) -> TrustedProxies:
    return TrustedProxies(ipaddress.ip_network(network) for network in networks)


@pytest.mark.parametrize(
    ("peer", "header", "client", "place"),
    [
        ("10.0.0.5", "", "10.0.0.5", None),  # a trusted proxy's own request
        ("10.0.0.5", "198.51.100.7", "198.51.100.7", 0),
        # The client put 192.0.2.1 there itself: only the entry the proxy wrote counts.
        ("10.0.0.5", "192.0.2.1, 198.51.100.7", "198.51.100.7", 1),
        # Trusted hops (a CDN edge in 10/8, then the ingress) are stepped over.
        ("10.0.0.5", "192.0.2.1, 198.51.100.7, 10.1.2.3", "198.51.100.7", 1),
        # Every hop trusted: the farthest one known.
        ("10.0.0.5", "10.9.9.9, 10.1.2.3", "10.9.9.9", 0),
        # Ports and brackets, as some proxies write them.
        ("10.0.0.5", "198.51.100.7:51234", "198.51.100.7", 0),
        ("10.0.0.5", "[2001:db8::7]:443", "2001:db8::7", 0),
        ("10.0.0.5", "2001:db8::7", "2001:db8::7", 0),
        # Not an address: the walk ends at the proxy that wrote it.
        ("10.0.0.5", "198.51.100.7, unknown", "10.0.0.5", None),
        ("10.0.0.5", "198.51.100.7, , 10.1.2.3", "10.1.2.3", 2),
    ],
)
def test_the_client_is_the_first_untrusted_hop_from_the_right(
    peer: str, header: str, client: str, place: int | None
) -> None:
    hops = [hop.strip() for hop in header.split(",")] if header else []
    found, index = forwarded_client(_address(peer), hops, _trusted("10.0.0.0/8"))
    assert (str(found), index) == (client, place)


def test_the_walk_is_bounded() -> None:
    hops = ["198.51.100.7", *["10.0.0.9"] * (10 * MAX_HOPS)]
    found, index = forwarded_client(_address("10.0.0.5"), hops, _trusted("10.0.0.0/8"))
    assert str(found) == "10.0.0.9" and index == len(hops) - MAX_HOPS


def test_an_ipv4_peer_on_a_dual_stack_socket_is_trusted_as_ipv4() -> None:
    assert _trusted("10.0.0.0/8").judge("::ffff:10.0.0.5") == (_address("10.0.0.5"), True)
    assert not _trusted("10.0.0.0/8").judge("::ffff:11.0.0.5")[1]
    assert not _trusted().judge("10.0.0.5")[1]


def test_remembered_verdicts_are_bounded_in_entries_and_bytes() -> None:
    trusted = _trusted("10.0.0.0/8")
    for n in range(3 * MEMO_ENTRIES):
        assert trusted.judge(str(ipaddress.ip_address(0x0A000000 + n))) == (
            ipaddress.ip_address(0x0A000000 + n),
            True,
        )
        assert trusted.remembered <= MEMO_ENTRIES
    long, remembered = "10.0.0.5:" + "9" * MEMO_TEXT_CHARS, trusted.remembered
    assert trusted.judge(long) == (_address("10.0.0.5"), True)  # the port is dropped
    assert trusted.remembered == remembered  # too long to remember
    assert (
        trusted.judge("192.0.2.1") == trusted.judge("192.0.2.1") == (_address("192.0.2.1"), False)
    )


def _address(text: str) -> Any:
    parsed = parse_address(text)
    assert parsed is not None
    return parsed


# --- the environ the app sees ------------------------------------------------------------


def _seen(environ: dict[str, Any], *, https_only: bool = True) -> tuple[str, dict[str, Any] | None]:
    """The status, and what the wrapped app saw (None if it was not called)."""
    seen: list[dict[str, Any]] = []
    status: list[str] = []

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(dict(env))
        start_response("200 OK", [])
        return [b""]

    middleware = ForwardedHeaders(app, _trusted("10.0.0.0/8"), https_only=https_only)
    base = {"REMOTE_ADDR": "10.0.0.5", "wsgi.url_scheme": "http", "HTTP_HOST": "10.0.0.9:8080"}
    body = b"".join(middleware({**base, **environ}, lambda s, h: status.append(s)))
    if not seen:
        assert json.loads(body)["status"] == 403
    return status[0], seen[0] if seen else None


def test_a_trusted_proxy_gives_the_client_scheme_and_host() -> None:
    status, env = _seen(
        {
            "HTTP_X_FORWARDED_FOR": "192.0.2.1, 198.51.100.7",
            "HTTP_X_FORWARDED_PROTO": "https",
            "HTTP_X_FORWARDED_HOST": "auth.example.com",
        }
    )
    assert status == "200 OK" and env is not None
    assert env["REMOTE_ADDR"] == "198.51.100.7"
    assert env["wsgi.url_scheme"] == "https"
    assert env["HTTP_HOST"] == "auth.example.com"


def test_an_untrusted_peer_changes_nothing() -> None:
    forged = {
        "REMOTE_ADDR": "192.0.2.50",
        "HTTP_X_FORWARDED_FOR": "198.51.100.7",
        "HTTP_X_FORWARDED_PROTO": "http",  # not refused either: nobody vouched for anything
        "HTTP_X_FORWARDED_HOST": "evil.example",
    }
    status, env = _seen(forged)
    assert status == "200 OK" and env is not None
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"], env["HTTP_HOST"]) == (
        "192.0.2.50",
        "http",
        "10.0.0.9:8080",
    )


def test_appended_proto_and_host_are_read_at_the_clients_place() -> None:
    # A CDN (10.1.2.3) took https from the client; the ingress appended its own hop.
    status, env = _seen(
        {
            "HTTP_X_FORWARDED_FOR": "198.51.100.7, 10.1.2.3",
            "HTTP_X_FORWARDED_PROTO": "https, http",
            "HTTP_X_FORWARDED_HOST": "auth.example.com, cdn-origin.internal",
        }
    )
    assert status == "200 OK" and env is not None
    assert env["wsgi.url_scheme"] == "https"
    assert env["HTTP_HOST"] == "auth.example.com"


def test_a_malformed_host_or_scheme_is_ignored() -> None:
    status, env = _seen(
        {"HTTP_X_FORWARDED_PROTO": "gopher", "HTTP_X_FORWARDED_HOST": "a.example/evil path"}
    )
    assert status == "200 OK" and env is not None
    assert (env["wsgi.url_scheme"], env["HTTP_HOST"]) == ("http", "10.0.0.9:8080")


def test_plain_http_at_the_proxy_is_refused_in_production_only() -> None:
    said_http = {"HTTP_X_FORWARDED_FOR": "198.51.100.7", "HTTP_X_FORWARDED_PROTO": "http"}
    assert _seen(said_http) == ("403 Forbidden", None)
    status, env = _seen(said_http, https_only=False)
    assert status == "200 OK" and env is not None and env["wsgi.url_scheme"] == "http"


# --- settings ----------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting from the environment running the tests."""
    for name in list(os.environ):
        if name.upper() in {field.upper() for field in Settings.model_fields}:
            monkeypatch.delenv(name)


PRODUCTION = {
    "database_url": "postgresql://u@127.0.0.1/db",
    "redis_url": "redis://127.0.0.1:6379/0",
    "secret_key": "s" * 48,
    "jwt_secret": "j" * 48,
    "jwt_issuer": "https://auth.example.com",
}


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"proxy_bind": "8080"}, "PROXY_BIND: '8080' is not host:port"),
        ({"proxy_bind": "0.0.0.0:8080, localhost"}, "'localhost' is not host:port"),
        ({"proxy_bind": "::1:8080"}, "'::1:8080' is not host:port"),
        ({"proxy_bind": "0.0.0.0:99999"}, "'0.0.0.0:99999' is not host:port"),
        ({"trusted_proxies": "10.0.0.7/8"}, "TRUSTED_PROXIES: 10.0.0.7/8 has host bits set"),
        ({"trusted_proxies": "ingress.internal"}, "TRUSTED_PROXIES: 'ingress.internal' does"),
    ],
)
def test_malformed_proxy_settings_are_refused(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(**PRODUCTION, **overrides)


@pytest.mark.usefixtures("clean_env")
def test_proxy_settings_are_read() -> None:
    settings = load_settings(
        **PRODUCTION, proxy_bind="0.0.0.0:8080, [::]:8080", trusted_proxies="10.0.0.0/8, ::1"
    )
    assert settings.proxy_binds == ["0.0.0.0:8080", "[::]:8080"]
    assert [str(n) for n in settings.trusted_networks] == ["10.0.0.0/8", "::1/128"]


@pytest.mark.usefixtures("clean_env")
def test_production_needs_no_certificate_with_only_the_proxy_listener(tmp_path: Path) -> None:
    settings = load_settings(**PRODUCTION, proxy_bind="0.0.0.0:8080")
    with pytest.raises(ConfigError, match="TLS_CERT_FILE and TLS_KEY_FILE"):
        hypercorn_config(settings)
    config: Any = hypercorn_config(settings, proxy_only=True)
    assert (config.bind, config.insecure_bind, config.ssl_enabled) == (["0.0.0.0:8080"], [], False)
    with pytest.raises(ConfigError, match="requires PROXY_BIND"):
        hypercorn_config(load_settings(**PRODUCTION), proxy_only=True)
    with pytest.raises(ConfigError, match="give no --bind"):
        hypercorn_config(settings, proxy_only=True, bind=["0.0.0.0:8443"])


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("tls", "proxy", "shared"),
    [
        ("127.0.0.1:8443", "127.0.0.1:8443", True),
        ("0.0.0.0:8443", "127.0.0.1:8443", True),
        ("[::]:8443", "127.0.0.1:8443", True),
        ("127.0.0.1:8443", "127.0.0.1:8080", False),
        ("127.0.0.1:8443", "[::1]:8443", False),
    ],
)
def test_the_proxy_listener_shares_no_port_with_tls(
    tmp_path: Path, tls: str, proxy: str, shared: bool
) -> None:
    settings = make_settings(tmp_path, service_env=Environment.DEVELOPMENT, proxy_bind=proxy)
    if shared:
        with pytest.raises(ConfigError, match="share a port"):
            hypercorn_config(settings, bind=[tls])
    else:
        config: Any = hypercorn_config(settings, bind=[tls])
        assert (config.bind, config.insecure_bind, config.ssl_enabled) == ([tls], [proxy], True)


def test_the_health_check_asks_the_proxy_port_when_bind_is_empty() -> None:
    assert healthz_url("0.0.0.0:8443", "0.0.0.0:8080") == "https://127.0.0.1:8443/healthz"
    assert healthz_url("", "[::]:8080, 0.0.0.0:8080") == "http://[::1]:8080/healthz"
    with pytest.raises(ValueError, match="PROXY_BIND=''"):
        healthz_url("", "")


# --- the real server: TLS on one port, plain HTTP/1.1 and h2c on another -----------------


@pytest.fixture(scope="module")
def server(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Two workers, TLS plus a proxy port; INGRESS is trusted; 3 failures per pair."""
    tmp = tmp_path_factory.mktemp("ingress")
    env = {
        **server_env(settings, tmp),
        "PROXY_BIND": f"127.0.0.1:{free_port()}",
        "TRUSTED_PROXIES": f"{INGRESS}/32",
        "LOGIN_FAILURES_PER_PAIR": "3",
    }
    running = start_server(env, workers=WORKERS, log_dir=tmp)
    try:
        wait_until_listening(running, WORKERS)
        _wait_for_log(running, "Running on http://", WORKERS)
        yield running
    finally:
        assert running.stop() == 0, running.log()
    assert "Traceback" not in running.log(), running.log()


def _proxy_url(server: RunningServer) -> str:
    return f"http://{server.env['PROXY_BIND']}"


def _client(base_url: str, *, source: str = "127.0.0.1", http2: bool = False) -> httpx.Client:
    """A client connecting from source; HTTP/2 on an http:// URL is h2c with prior knowledge."""
    transport = httpx.HTTPTransport(
        local_address=source, http1=not http2, http2=http2, verify=False
    )
    return httpx.Client(base_url=base_url, transport=transport)


def _wait_for_log(server: RunningServer, text: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.log().count(text) < count:
        assert server.process.poll() is None, server.log()
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)


def _register(server: RunningServer) -> str:
    username = f"px_{uuid.uuid4().hex[:10]}"
    with _client(_proxy_url(server)) as http:
        body = {"username": username, "password": PASSWORD}
        assert http.post("/auth/register", json=body).status_code == 201
    return username


def _login(http: httpx.Client, username: str, password: str, **headers: str) -> int:
    body = {"username": username, "password": password}
    return http.post("/auth/login", json=body, headers=headers).status_code


def test_http11_and_h2c_with_prior_knowledge_on_the_proxy_port(server: RunningServer) -> None:
    with _client(_proxy_url(server)) as http:
        response = http.get("/healthz")
        assert (response.http_version, response.status_code) == ("HTTP/1.1", 200)
    username = _register(server)
    with _client(_proxy_url(server), http2=True) as http:
        response = http.post("/auth/login", json={"username": username, "password": PASSWORD})
        assert (response.http_version, response.status_code) == ("HTTP/2", 200)
        bearer = {"Authorization": f"Bearer {response.json()['access_token']}"}
        hello = http.get("/api/hello", headers=bearer)
        assert (hello.http_version, hello.json()) == ("HTTP/2", {"message": f"Hello, {username}!"})
        assert http.post("/auth/logout", headers=bearer).status_code == 204
        assert http.get("/api/hello", headers=bearer).status_code == 401


def test_h2c_by_upgrade_on_the_proxy_port(server: RunningServer) -> None:
    host, port = _host_port(_proxy_url(server))
    status, headers, body = _h2c_upgrade(host, port, "/healthz")
    assert status.startswith(b"HTTP/1.1 101"), status
    assert headers[b":status"] == b"200"
    assert json.loads(body)["status"] == "ok"


def test_every_worker_listens_on_the_proxy_port(server: RunningServer) -> None:
    pids = set()
    for _ in range(80):
        with _client(_proxy_url(server)) as http:
            pids.add(http.get("/healthz").json()["worker"])
        if len(pids) == WORKERS:
            break
    assert len(pids) == WORKERS, pids


def test_the_tls_listener_is_unchanged(server: RunningServer) -> None:
    with _client(server.url, http2=True) as http:
        response = http.get("/healthz")
        assert (response.http_version, response.status_code) == ("HTTP/2", 200)
    with pytest.raises(httpx.HTTPError), _client(server.url.replace("https:", "http:")) as http:
        http.get("/healthz")  # no plain HTTP on the TLS port


def test_sign_ins_are_counted_per_forwarded_client_of_a_trusted_proxy(
    server: RunningServer,
) -> None:
    username = _register(server)
    with _client(_proxy_url(server), source=INGRESS) as ingress:
        for _ in range(3):
            assert _login(ingress, username, WRONG, x_forwarded_for="198.51.100.7") == 401
        assert _login(ingress, username, PASSWORD, x_forwarded_for="198.51.100.7") == 429
        # Whatever the client claims left of the entry the ingress wrote does not help.
        assert (
            _login(ingress, username, PASSWORD, x_forwarded_for="198.51.100.8, 198.51.100.7") == 429
        )
        # Another client behind the same ingress signs in.
        assert _login(ingress, username, PASSWORD, x_forwarded_for="198.51.100.8") == 200
    # Peer-based, whichever listener: the ingress re-encrypting to the TLS port counts the same.
    with _client(server.url, source=INGRESS) as ingress:
        assert _login(ingress, username, PASSWORD, x_forwarded_for="198.51.100.7") == 429


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(server: RunningServer) -> None:
    username = _register(server)
    with _client(_proxy_url(server), source=STRANGER) as stranger:
        for attempt in range(3):  # a new forged address each time
            forged = f"203.0.113.{attempt + 1}"
            assert _login(stranger, username, WRONG, x_forwarded_for=forged) == 401
        assert _login(stranger, username, PASSWORD, x_forwarded_for="203.0.113.99") == 429
    with _client(_proxy_url(server), source=INGRESS) as ingress:
        # The forged addresses were never counted: behind the ingress, 203.0.113.1 is clean.
        assert _login(ingress, username, PASSWORD, x_forwarded_for="203.0.113.1") == 200


def test_oauth_over_plain_http_needs_a_trusted_proxy_that_says_https(
    server: RunningServer,
) -> None:
    form = {"grant_type": "client_credentials", "client_id": "nobody", "client_secret": "x"}
    public = {"host": "auth.example.com", "x-forwarded-proto": "https"}
    with _client(_proxy_url(server), source=STRANGER) as stranger:
        response = stranger.post("/oauth/token", data=form, headers=public)
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "insecure_transport"
    with _client(_proxy_url(server), source=INGRESS) as ingress:
        response = ingress.post("/oauth/token", data=form, headers=public)
        assert response.json()["error"] == "invalid_client", response.text
        said_http = {**public, "x-forwarded-proto": "http"}
        refused = ingress.post(
            "/auth/login", json={"username": "x", "password": WRONG}, headers=said_http
        )
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/problem+json"
        assert "https only" in refused.json()["detail"]


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def _h2c_upgrade(host: str, port: int, path: str) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """GET path over HTTP/1.1 asking to upgrade to h2c: the 101 line, then stream 1's answer."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = connection.initiate_upgrade_connection()
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: Upgrade, HTTP2-Settings"
            "\r\nUpgrade: h2c\r\nHTTP2-Settings: ".encode()
            + settings
            + b"\r\n\r\n"
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed before the 101: {data!r}"
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        sock.sendall(connection.data_to_send())
        headers: dict[bytes, bytes] = {}
        body = io.BytesIO()
        while True:
            for event in connection.receive_data(rest):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                    headers = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == 1:
                    body.write(event.data)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == 1:
                    return head.split(b"\r\n")[0], headers, body.getvalue()
            sock.sendall(connection.data_to_send())
            rest = sock.recv(65536)
            assert rest, "closed before the response"


# --- production behind an ingress alone --------------------------------------------------


@pytest.mark.fault
def test_production_serves_the_proxy_port_alone_without_a_certificate(
    settings: Settings, tmp_path: Path
) -> None:
    proxy_bind = f"127.0.0.1:{free_port()}"
    env = {**server_env(settings, tmp_path), "PROXY_BIND": proxy_bind}
    server = start_server(env, workers=1, log_dir=tmp_path, proxy_only=True, unset=("TLS_",))
    try:
        assert server.url == f"http://{proxy_bind}"
        assert "Running on https://" not in server.log(), server.log()
        with _client(server.url, http2=True) as http:
            response = http.get("/readyz")
            assert (response.http_version, response.status_code) == ("HTTP/2", 200)
        check = subprocess.run(
            [sys.executable, str(ROOT / "docker" / "healthcheck.py")],
            env={**os.environ, "BIND": "", "PROXY_BIND": proxy_bind},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr
        os.kill(server.process.pid, signal.SIGTERM)  # the master only, as a supervisor does
        assert _seconds_until_refused(_host_port(server.url)) < 5
        assert server.process.wait(30) == 0, server.log()
        assert "Traceback" not in server.log(), server.log()
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.stop()


@pytest.mark.fault
def test_a_taken_proxy_port_stops_the_start_in_one_line(settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proxy_bind = f"127.0.0.1:{taken.getsockname()[1]}"
        env = {**server_env(settings, tmp_path), "PROXY_BIND": proxy_bind}
        server = launch_server(env, bind=f"127.0.0.1:{free_port()}", workers=2, log_dir=tmp_path)
        try:
            assert server.process.wait(60) == 1, server.log()
        finally:
            server.stop()
    line = f"cannot listen on {proxy_bind}: another process is listening there"
    assert line in server.log(), server.log()
    assert "Traceback" not in server.log(), server.log()


def _seconds_until_refused(address: tuple[str, int], limit: float = 10.0) -> float:
    """Connect again and again until the address refuses; how long that took."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            with socket.create_connection(address, timeout=1):
                pass
        except ConnectionRefusedError:
            return time.monotonic() - start
        except TimeoutError:
            pass
        time.sleep(0.05)
    return limit

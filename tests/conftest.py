"""Real PostgreSQL and Redis for every test: found, or started, or the run stops and says why."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask

from service import create_app, server
from service.config import PERFORMANCE_CHANGES, Environment, Settings
from service.server import build_asgi_app
from service.store.migrate import upgrade
from tests.proxy import TcpProxy
from tests.servers import SnapshottingRedis, enabled_changes

INSTALL_HINT = {
    "postgres": "PostgreSQL: set DATABASE_URL, or run a server on 127.0.0.1:5432, or install one "
    "(Debian: apt-get install postgresql) so pytest-postgresql can start a throwaway server.",
    "redis": "Redis: set REDIS_URL, or run a server on 127.0.0.1:6379, or install one "
    "(Debian: apt-get install redis-server) so pytest-redis can start a throwaway server.",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the tests of a library change this run leaves out (LIBRARY_CHANGES)."""
    enabled = enabled_changes()
    for item in items:
        for marker in item.iter_markers("library_change"):
            (name,) = marker.args
            assert name in PERFORMANCE_CHANGES, f"{item.nodeid}: no library change {name!r}"
            if name not in enabled:
                item.add_marker(pytest.mark.skip(reason=f"{name} is off (LIBRARY_CHANGES)"))


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _missing(what: str) -> None:
    pytest.exit(f"cannot run the tests without {INSTALL_HINT[what]}", returncode=3)


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> str:
    """A libpq URL of a PostgreSQL server we may create databases on."""
    if url := os.environ.get("DATABASE_URL"):
        return url.replace("postgresql+asyncpg://", "postgresql://")
    if _answers("127.0.0.1", 5432):
        return "postgresql://postgres@127.0.0.1:5432/postgres"
    if shutil.which("pg_ctl"):
        proc = request.getfixturevalue("postgresql_proc")
        return f"postgresql://{proc.user}@{proc.host}:{proc.port}/postgres"
    _missing("postgres")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> str:
    """A Redis URL; tests only touch keys under their own prefix."""
    if url := os.environ.get("REDIS_URL"):
        return url
    if _answers("127.0.0.1", 6379):
        return "redis://127.0.0.1:6379/0"
    if shutil.which("redis-server"):
        proc = request.getfixturevalue("redis_proc")
        return f"redis://{proc.host}:{proc.port}/0"
    _missing("redis")
    raise AssertionError("unreachable")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextmanager
def fresh_database(postgres_server: str) -> Iterator[str]:
    """A database of its own on the server, dropped afterwards; yields its URL."""
    name = f"authsvc_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(postgres_server, name)
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url(postgres_server: str) -> Iterator[str]:
    """A fresh database for this test run, migrated to head, dropped afterwards."""
    with fresh_database(postgres_server) as url:
        yield url


@pytest.fixture(scope="session")
def redis_prefix(redis_server: str) -> Iterator[str]:
    """A key prefix of this run; its keys (and only those) are deleted at the end."""
    prefix = f"authsvc-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    delete_prefix(redis_server, prefix)


def delete_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key under prefix."""
    client = redis.Redis.from_url(redis_url)
    try:
        for batch in _batched(client.scan_iter(match=f"{prefix}*", count=1000), 500):
            client.delete(*batch)
    finally:
        client.close()


def _batched(items: Any, size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def make_settings(tmp: Path, **overrides: Any) -> Settings:
    """Production-mode settings with fresh random secrets."""
    values: dict[str, Any] = {
        "service_env": Environment.PRODUCTION,
        "instance_dir": tmp,
        "jwt_secret": secrets.token_urlsafe(48),
        "secret_key": secrets.token_urlsafe(48),
        "jwt_issuer": "https://testserver",
        "password_memory_kib": 7168,
        "password_time_cost": 1,
        "password_queue_limit": 256,
        "redis_timeout": 0.5,
    }
    values.update(overrides)
    return Settings(**values)


def settings_beside(settings: Settings, tmp: Path, **overrides: Any) -> Settings:
    """Production settings for another app on the same database, Redis and secrets as settings."""
    shared: dict[str, Any] = {
        "database_url": settings.database_url,
        "redis_url": settings.redis_url,
        "redis_prefix": settings.redis_prefix,
        "secret_key": settings.secret_key,  # the stored OAuth signing keys are sealed with it
        "jwt_secret": settings.jwt_secret,  # tokens of one app pass at the other
    }
    return make_settings(tmp, **(shared | overrides))


@pytest.fixture(scope="session")
def settings(
    database_url: str,
    redis_server: str,
    redis_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Settings:
    """Settings of the shared app under test, against the real backends."""
    result = make_settings(
        tmp_path_factory.mktemp("instance"),
        database_url=database_url,
        redis_url=redis_server,
        redis_prefix=redis_prefix,
    )
    upgrade(result)
    return result


@pytest.fixture(scope="session")
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client speaking to the ASGI app that Hypercorn serves, in process."""
    async with serve_in_process(settings) as http:
        yield http


class serve_in_process:
    """Build the ASGI app for settings, run its lifespan, and give an httpx client for it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = build_asgi_app(settings)

    async def __aenter__(self) -> httpx.AsyncClient:
        await self.app.startup()
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="https://testserver"
        )
        return self.http

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        await self.app.shutdown()


class Session:
    """A logged-in user as a client sees it."""

    def __init__(self, username: str, password: str, tokens: dict[str, Any]) -> None:
        self.username = username
        self.password = password
        self.access = tokens["access_token"]
        self.refresh = tokens["refresh_token"]

    def bearer(self, token: str | None = None) -> dict[str, str]:
        """Authorization header for the access token (or another token)."""
        return {"Authorization": f"Bearer {token or self.access}"}


async def register(http: httpx.AsyncClient, password: str = "correct horse battery") -> str:
    """Register a new user with a unique name; returns the username."""
    username = f"user_{uuid.uuid4().hex[:12]}"
    response = await http.post("/auth/register", json={"username": username, "password": password})
    assert response.status_code == 201, response.text
    return username


async def login(http: httpx.AsyncClient, username: str, password: str) -> Session:
    """Log in and return the session."""
    response = await http.post("/auth/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return Session(username, password, response.json())


async def two_sessions(http: httpx.AsyncClient) -> tuple[Session, Session]:
    """One new user logged in twice: two sessions (say, two devices)."""
    password = "correct horse battery"
    username = await register(http, password)
    return await login(http, username, password), await login(http, username, password)


async def wait_for_status(http: httpx.AsyncClient, headers: dict[str, str], status: int) -> None:
    """Poll the protected resource with headers until it answers status (10 s at most)."""
    deadline = time.monotonic() + 10
    while (await http.get("/api/hello", headers=headers)).status_code != status:
        assert time.monotonic() < deadline, f"never answered {status}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def user(client: httpx.AsyncClient) -> Session:
    """A freshly registered and logged-in user."""
    password = "correct horse battery"
    return await login(client, await register(client, password), password)


@pytest.fixture
async def cut_redis(
    settings: Settings, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, TcpProxy]]:
    """An app whose Redis sits behind a proxy the test can cut."""
    upstream = urlsplit(str(settings.redis_url))
    proxy = TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 6379)
    proxy.start()
    try:
        proxied = settings_beside(
            settings,
            tmp_path,
            redis_url=f"redis://127.0.0.1:{proxy.port}{upstream.path or '/0'}",
            redis_timeout=0.3,
        )
        async with serve_in_process(proxied) as http:
            yield http, proxy
    finally:
        proxy.close()


@pytest.fixture
def snapshotting_redis(tmp_path: Path) -> Iterator[SnapshottingRedis]:
    """A private Redis; needs the redis-server binary (always there in CI)."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: apt-get install redis-server")
        pytest.skip("redis-server is not installed")
    server = SnapshottingRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix(settings: Settings) -> Iterator[str]:
    """A Redis key prefix (and channel) of this test's own, emptied afterwards."""
    own = f"{settings.redis_prefix}t-{uuid.uuid4().hex[:8]}:"
    yield own
    delete_prefix(str(settings.redis_url), own)


@pytest.fixture
def captured_app(monkeypatch: pytest.MonkeyPatch) -> list[Flask]:
    """The Flask apps that serve_in_process builds from now on."""
    apps: list[Flask] = []

    def create(settings: Settings | None = None) -> Flask:
        app = create_app(settings)
        apps.append(app)
        return app

    monkeypatch.setattr(server, "create_app", create)
    return apps


README = Path(__file__).resolve().parent.parent / "README.md"
DOCUMENTED = re.compile(r"^redis-cli (ACL SETUSER authsvc .*?)\n```", re.MULTILINE | re.DOTALL)


def documented_acl() -> list[str]:
    """The README's ACL SETUSER command, as arguments for the default user and prefix."""
    found = DOCUMENTED.search(README.read_text())
    assert found, "the README shows no ACL SETUSER command"
    return shlex.split(found.group(1).replace("\\\n", " "))


def for_user(arguments: list[str], user: str, password: str, prefix: str) -> list[str]:
    """The documented command, for another user name, password and key prefix."""
    replaced = {"authsvc": user, ">PASSWORD": f">{password}"}
    out = [replaced.get(argument, argument) for argument in arguments]
    return [re.sub(r"^([~&])authsvc:", rf"\g<1>{prefix}", argument) for argument in out]


def with_user(url: str, user: str, password: str) -> str:
    """The Redis URL with these credentials in place of any it had."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = urlencode({**dict(parse_qsl(parts.query)), "username": user, "password": password})
        return f"unix://{parts.path}?{query}"
    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
    host = parts.hostname or "127.0.0.1"
    netloc = f"{credentials}@{f'[{host}]' if ':' in host else host}:{parts.port or 6379}"
    return urlunsplit(parts._replace(netloc=netloc))


@contextmanager
def acl_user(settings: Settings, prefix: str, *, without: tuple[str, ...] = ()) -> Iterator[str]:
    """A Redis user with the documented rights (less some) on prefix; yields its URL."""
    user, password = f"authsvc-test-{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(16)
    arguments = [a for a in documented_acl() if a not in without]
    admin = redis.Redis.from_url(str(settings.redis_url))
    admin.execute_command(*for_user(arguments, user, password, prefix))
    try:
        yield with_user(str(settings.redis_url), user, password)
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


def write_key(directory: Path, algorithm: str) -> Path:
    """A PEM private key for algorithm, written to directory."""
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    path = directory / f"{algorithm}.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path

"""The least-privilege Redis ACL in the README is enough for every Redis use of the service."""

from __future__ import annotations

import logging
import re
import secrets
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pytest
import redis

from service.config import Settings
from tests.conftest import login, register, serve_in_process

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


@pytest.fixture
def acl_settings(settings: Settings, prefix: str) -> Iterator[Settings]:
    """Settings whose Redis user holds exactly the documented rights, on a prefix of its own."""
    user, password = f"authsvc-test-{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(16)
    admin = redis.Redis.from_url(str(settings.redis_url))
    admin.execute_command(*for_user(documented_acl(), user, password, prefix))
    try:
        url = with_user(str(settings.redis_url), user, password)
        yield settings.model_copy(update={"redis_url": url, "redis_prefix": prefix})
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


def test_the_documented_acl_is_read_whole() -> None:
    arguments = documented_acl()
    assert arguments[:3] == ["ACL", "SETUSER", "authsvc"]
    assert {"~authsvc:*", "&authsvc:revoked", "-@all", "+evalsha", "+subscribe"} <= set(arguments)


async def test_every_flow_runs_under_the_documented_acl(
    acl_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    # A prefix Redis has never seen: start-up rebuilds the blocklist from PostgreSQL.
    async with serve_in_process(acl_settings) as http:
        assert (await http.get("/readyz")).status_code == 200
        password = "correct horse battery"
        username = await register(http, password)
        session = await login(http, username, password)
        for _ in range(3):  # the first check subscribes to the feed; the later may use it
            assert (await http.get("/api/hello", headers=session.bearer())).status_code == 200
        refreshed = await http.post("/auth/refresh", headers=session.bearer(session.refresh))
        assert refreshed.status_code == 200, refreshed.text
        assert (await http.post("/auth/logout", headers=session.bearer())).status_code == 204
        assert (await http.get("/api/hello", headers=session.bearer())).status_code == 401
        # Failed sign-ins are counted (and refused past the limit) with the same rights.
        wrong = {"username": "acl_nobody", "password": "not the password"}
        answers = [await http.post("/auth/login", json=wrong) for _ in range(6)]
        assert [a.status_code for a in answers] == [401] * 5 + [429]
        other = await login(http, username, password)
        assert (await http.post("/auth/logout-all", headers=other.bearer())).status_code == 204
        assert (await http.get("/api/hello", headers=other.bearer())).status_code == 401
    # A right it lacks shows as a warning (the feed, start-up) if not as a failed request.
    complaints = [r.getMessage() for r in caplog.records if r.name.startswith("service")]
    assert complaints == []

"""The least-privilege Redis ACL in the README is enough for every Redis use of the service."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.config import Settings
from service.store.migrate import upgrade
from tests.conftest import (
    acl_user,
    documented_acl,
    fresh_database,
    login,
    register,
    serve_in_process,
    settings_beside,
)

# The session's shared app (the client fixture) verifies its own prefix against the shared
# database, into which other tests' apps record revocations of their own: it may log that
# its Redis lags and reload, in this process, while this test runs. This test's app has a
# database of its own and never has cause to.
OTHER_APPS_VERIFYING = ("Redis holds revocations up to #", "blocklist loaded from the durable")
# Failures that say nothing of rights (a missing one is a NoPermissionError): a round of
# verification, this app's or another's in this process, that timed out on a busy machine.
NOT_ABOUT_RIGHTS = ("TimeoutError", "ConnectionError", "unreachable moments ago")


@pytest.fixture
def acl_settings(
    settings: Settings, prefix: str, postgres_server: str, tmp_path: Path
) -> Iterator[Settings]:
    """Settings whose Redis user holds exactly the documented rights, on a prefix of its own.

    And on a database of its own: verification compares this prefix's Redis with every
    revocation the database recorded (and the marks other writers left there), and the
    test requires that it never complains.
    """
    with acl_user(settings, prefix) as url, fresh_database(postgres_server) as database_url:
        own = settings_beside(
            settings, tmp_path, redis_url=url, redis_prefix=prefix, database_url=database_url
        )
        upgrade(own)
        yield own


def test_the_documented_acl_is_read_whole() -> None:
    arguments = documented_acl()
    assert arguments[:3] == ["ACL", "SETUSER", "authsvc"]
    assert {"~authsvc:*", "&authsvc:revoked*", "-@all", "+evalsha", "+subscribe"} <= set(arguments)


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
    # A right it lacks shows as a warning (the feed, start-up) if not as a failed request;
    # the audit lines (the throttled sign-in's is a warning) say what happened, as asked.
    complaints = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("service")
        and r.name != "service.audit"
        and not r.getMessage().startswith(OTHER_APPS_VERIFYING)
        and not r.getMessage().endswith(NOT_ABOUT_RIGHTS)
    ]
    assert complaints == []

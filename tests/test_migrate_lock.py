"""Replicas that start at once all run `python -m service migrate`: each step is applied once."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from alembic.script import ScriptDirectory

from service.store.migrate import MIGRATIONS
from tests.conftest import fresh_database

ROOT = Path(__file__).resolve().parent.parent
REPLICAS = 4


def _lock_waits(admin: psycopg.Connection[tuple[str]], database: str) -> list[str]:
    """What each backend of database is waiting for, among those waiting on a lock."""
    rows = admin.execute(
        "SELECT wait_event FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
        (database,),
    ).fetchall()
    return sorted(row[0] for row in rows)


def _lock_tries(admin: psycopg.Connection[tuple[str]], database: str) -> int:
    """How many backends of database have asked for the migration lock (and hold or poll it)."""
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
        "AND query LIKE '%%pg_try_advisory_lock%%'",
        (database,),
    ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.fault
def test_concurrent_migrate_runs_wait_for_each_other_and_all_succeed(
    postgres_server: str, tmp_path: Path
) -> None:
    env = os.environ | {
        "SERVICE_ENV": "production",
        "INSTANCE_DIR": str(tmp_path),
        "REDIS_URL": "redis://127.0.0.1:6379/0",  # required by the settings; migrate never calls it
        "SECRET_KEY": secrets.token_urlsafe(48),
        "JWT_SECRET": secrets.token_urlsafe(48),
        "JWT_ISSUER": "https://127.0.0.1:8443",
    }
    with (
        fresh_database(postgres_server) as url,
        psycopg.connect(postgres_server, autocommit=True) as admin,
        psycopg.connect(url) as gate,
    ):
        database = url.rsplit("/", 1)[1]
        # An uncommitted table of the name Alembic creates first: every run that gets as far
        # as creating it waits here, so all of them are in flight when the gate opens.
        gate.execute("CREATE TABLE alembic_version (version_num varchar(32) NOT NULL)")
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "service", "migrate"],
                cwd=ROOT,
                env=env | {"DATABASE_URL": url},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(REPLICAS)
        ]
        try:
            deadline = time.monotonic() + 60
            # One run holds the lock and waits at the gate; the others poll for the lock.
            while (waits := _lock_waits(admin, database)) != ["transactionid"] or (
                _lock_tries(admin, database) < REPLICAS
            ):
                assert all(p.poll() is None for p in procs), "a migrate run ended early"
                assert time.monotonic() < deadline, f"only these waited: {waits}"
                time.sleep(0.05)
            gate.rollback()
            outcomes = [(p.wait(timeout=60), p.communicate()[1]) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for status, stderr in outcomes:
            assert status == 0, stderr
        # One run went ahead (into the gate); the others waited for the advisory lock.
        assert waits == ["transactionid"]
        with psycopg.connect(url) as conn:
            versions = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    assert versions == [(ScriptDirectory(str(MIGRATIONS)).get_current_head(),)]

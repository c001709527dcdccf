"""Migration 0006 (the user of each revocation) on a live table, and what it records."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
from alembic import command

from service.store.groups import group_of
from service.store.migrate import alembic_config, upgrade
from tests.conftest import fresh_database, make_settings


def test_0006_gives_way_to_a_live_table_and_keeps_older_rows(
    postgres_server: str, tmp_path: Path
) -> None:
    """Behind a long transaction on revocations, reads are never held up for long."""
    with fresh_database(postgres_server) as url:
        own = make_settings(tmp_path, database_url=url, redis_url="redis://127.0.0.1:1/0")
        upgrade(own, "0005")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO revocations (kind, subject, expires_at, created_at) "
                "VALUES ('session', 'old', now() + interval '1 hour', now())"
            )
        holder = psycopg.connect(url)
        holder.execute("SELECT count(*) FROM revocations")  # a long transaction on the table
        migrating = threading.Thread(target=upgrade, args=(own, "0006"))
        migrating.start()
        try:
            time.sleep(0.5)
            with psycopg.connect(url, autocommit=True, options="-c statement_timeout=5000") as r:
                started = time.monotonic()
                r.execute("SELECT count(*) FROM revocations")
                waited = time.monotonic() - started
            assert waited < 3.5, f"a read waited {waited:.1f} s behind the migration"
            assert migrating.is_alive()
        finally:
            holder.close()
            migrating.join(60)
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0006",)
            row = conn.execute(
                "SELECT user_id, user_group FROM revocations WHERE subject = 'old'"
            ).fetchone()
            assert row == (None, None)
            valid = conn.execute(
                "SELECT indisvalid FROM pg_index "
                "WHERE indexrelid = 'ix_revocations_user_group_seq'::regclass"
            ).fetchone()
            assert valid == (True,)
        command.downgrade(alembic_config(own), "0005")
        upgrade(own)


def test_group_of_is_stable() -> None:
    """Recorded groups must never move: crc32 of the user id, mod 256."""
    assert [group_of(str(n)) for n in range(3)] == [33, 183, 13]

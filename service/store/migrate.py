"""Schema migrations (Alembic), applied by `python -m service migrate`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import pool, text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from service.config import Settings
from service.loop import LoopThread
from service.store.db import database_url

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The PostgreSQL advisory lock key that every `migrate` run of this service takes ("authsvc").
MIGRATION_LOCK_KEY = int.from_bytes(b"authsvc")


def alembic_config(settings: Settings) -> Config:
    """An Alembic config pointing at this package's migrations and the configured database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url(settings).replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Bring the schema up to revision (blocking; call it outside a running event loop)."""
    with migration_lock(settings):
        command.upgrade(alembic_config(settings), revision)


@contextmanager
def migration_lock(settings: Settings) -> Iterator[None]:
    """Hold a PostgreSQL advisory lock, so replicas migrating at once apply each step once."""
    url = database_url(settings)
    if not url.startswith("postgresql"):
        yield
        return
    # Alembic runs an event loop of its own in this thread: the lock's connection needs another.
    thread = LoopThread("migration-lock")
    try:
        conn = thread.run(_lock(url))
        try:
            yield
        finally:
            thread.run(conn.close())  # ending the session releases the lock
    finally:
        thread.stop()


async def _lock(url: str) -> AsyncConnection:
    conn = await create_async_engine(url, poolclass=pool.NullPool).connect()
    key = {"key": MIGRATION_LOCK_KEY}
    if not (await conn.execute(text("SELECT pg_try_advisory_lock(:key)"), key)).scalar():
        log.info("another process is migrating this database: waiting for it to finish")
        await conn.execute(text("SELECT pg_advisory_lock(:key)"), key)
    return conn

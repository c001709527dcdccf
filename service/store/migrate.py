"""Schema migrations (Alembic), applied by `python -m service migrate`."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import pool, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from service.config import DatabaseUnavailable, Settings
from service.loop import WorkerLoop
from service.store.db import bounds, database_url

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The PostgreSQL advisory lock key that every `migrate` run of this service takes ("authsvc").
MIGRATION_LOCK_KEY = int.from_bytes(b"authsvc")
LOCK_POLL_SECONDS = 0.2


def alembic_config(settings: Settings) -> Config:
    """An Alembic config pointing at this package's migrations and the configured database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url(settings).replace("%", "%%"))
    config.attributes["configure_logger"] = False
    if not settings.embedded_database:
        # Connecting is bounded; statements are not: a schema change may rightly run long.
        config.attributes["connect_args"] = bounds(settings, statements=False)
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Bring the schema up to revision (blocking; call it outside a running event loop)."""
    with database_errors(settings), migration_lock(settings):
        command.upgrade(alembic_config(settings), revision)


@contextmanager
def database_errors(settings: Settings) -> Iterator[None]:
    """Turn a failure to reach or use the database into DatabaseUnavailable."""
    try:
        yield
    except (OSError, SQLAlchemyError) as exc:
        raise DatabaseUnavailable(describe(exc, settings)) from exc


def describe(exc: BaseException, settings: Settings) -> str:
    """What went wrong, naming the database but never its password."""
    url = make_url(database_url(settings))
    where = (
        f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
        if url.get_backend_name() == "postgresql"
        else str(url.database)
    )
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the database host {url.host!r}: {exc.strerror}"
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to the database at {where}: connection refused"
    if isinstance(exc, TimeoutError):
        return f"cannot connect to the database at {where}: timed out"
    if isinstance(exc, OSError):
        return f"cannot connect to the database at {where}: {exc.strerror or exc}"
    if isinstance(exc, NoSuchModuleError):
        return f"DATABASE_URL names a driver that is not installed: {url.drivername}"
    if isinstance(exc, DBAPIError):
        return f"the database at {where} answered: {_first_line(exc.orig)}"
    return f"the database at {where} failed: {_first_line(exc)}"


def _first_line(exc: BaseException | None) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@contextmanager
def migration_lock(settings: Settings) -> Iterator[None]:
    """Hold a PostgreSQL advisory lock, so replicas migrating at once apply each step once."""
    url = database_url(settings)
    if not url.startswith("postgresql"):
        yield
        return
    # Alembic runs an event loop of its own in this thread: the lock's connection needs another.
    thread = WorkerLoop("migration-lock")
    try:
        conn = thread.run(_lock(url, bounds(settings, statements=False)))
        try:
            yield
        finally:
            thread.run(conn.close())  # ending the session releases the lock
    finally:
        thread.stop()


async def _lock(url: str, connect_args: dict[str, Any]) -> AsyncConnection:
    conn = await create_async_engine(
        url, poolclass=pool.NullPool, connect_args=connect_args
    ).connect()
    # CREATE INDEX CONCURRENTLY (in a migration) waits for every transaction of the
    # database that holds a snapshot. So the lock is held by the session, outside any
    # transaction, and a run that must wait asks again and again rather than waiting in a
    # statement: the migration it waits for would otherwise wait for it, for ever.
    await conn.execution_options(isolation_level="AUTOCOMMIT")
    statement, key = text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
    waiting = False
    while not (await conn.execute(statement, key)).scalar():
        if not waiting:
            log.info("another process is migrating this database: waiting for it to finish")
            waiting = True
        await asyncio.sleep(LOCK_POLL_SECONDS)
    return conn

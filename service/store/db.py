"""The SQLAlchemy async engine and session factory, one per worker process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, exc, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from service import metrics
from service.config import Settings

# SQLSTATE classes of a database that cannot answer now, not of a wrong request: connection
# exception, insufficient resources, operator intervention (statement_timeout, shutdown).
UNAVAILABLE_SQLSTATES = frozenset({"08", "53", "57"})


def database_url(settings: Settings) -> str:
    """Return the async driver URL: asyncpg for PostgreSQL, aiosqlite for the embedded file."""
    if settings.database_url is None:
        path = (settings.instance_dir / "dev.sqlite3").resolve()
        return f"sqlite+aiosqlite:///{path}"
    url = make_url(settings.database_url)
    if url.drivername in {"postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2"}:
        url = url.set(drivername="postgresql+asyncpg")
    return url.render_as_string(hide_password=False)


def bounds(settings: Settings, *, statements: bool = True) -> dict[str, Any]:
    """asyncpg's connect arguments that bound every call: connect, and each statement.

    A hung server (a stopped process, a network black hole) refuses nothing: without
    these, a call waits for as long as it hangs. PostgreSQL is given the statement bound
    too, so that it stops work the service gave up on.
    """
    server_settings = {"application_name": "authsvc"}
    args: dict[str, Any] = {"timeout": settings.database_connect_timeout}
    if statements:
        seconds = settings.database_statement_timeout
        args["command_timeout"] = seconds
        server_settings["statement_timeout"] = str(max(1, round(seconds * 1000)))
    args["server_settings"] = server_settings
    return args


def unavailable_reason(error: BaseException) -> str | None:
    """Why the database could not answer (down, hung, out of connections), else None.

    Named by kind only: a database error's text carries its statement and parameters.
    """
    if isinstance(error, exc.TimeoutError):
        return "no pooled connection free in time (DATABASE_POOL_TIMEOUT)"
    if isinstance(error, TimeoutError):
        return "no answer in time (DATABASE_CONNECT_TIMEOUT, DATABASE_STATEMENT_TIMEOUT)"
    if isinstance(error, ConnectionError):
        return type(error).__name__
    if isinstance(error, exc.DBAPIError):
        sqlstate = str(getattr(error.orig, "sqlstate", None) or "")
        unavailable = isinstance(error, exc.OperationalError | exc.InterfaceError)
        if unavailable or sqlstate[:2] in UNAVAILABLE_SQLSTATES:
            return f"{type(error).__name__} (SQLSTATE {sqlstate or 'unknown'})"
    return None


class Database:
    """Owns the pooled engine of the current process; created lazily, never in a parent."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._autocommit: AsyncEngine | None = None
        self._pid: int | None = None

    @property
    def url(self) -> str:
        """The driver URL this database connects to."""
        return database_url(self._settings)

    @property
    def engine(self) -> AsyncEngine:
        """Return this process's engine, creating it on first use."""
        if self._engine is None or self._pid != os.getpid():
            self._engine = _create_engine(self.url, self._settings)
            self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)
            self._autocommit = self._engine.execution_options(isolation_level="AUTOCOMMIT")
            self._pid = os.getpid()
        return self._engine

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """Yield a session in a transaction, committed on success and rolled back on error."""
        self.engine  # noqa: B018 - makes sure the factory exists in this process
        assert self._sessions is not None
        async with self._sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def statement(self) -> AsyncIterator[AsyncConnection]:
        """Yield a pooled connection on which each statement commits by itself.

        For a single statement on a request's path: no ORM session, no BEGIN and COMMIT
        round trips (about a quarter of the CPU of the same UPDATE through a session).
        """
        self.engine  # noqa: B018 - makes sure the factory exists in this process
        assert self._autocommit is not None
        async with self._autocommit.connect() as connection:
            yield connection

    async def ping(self) -> None:
        """Run a trivial query; raises when the database does not answer."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        """Close every pooled connection of this process."""
        if self._engine is not None and self._pid == os.getpid():
            await self._engine.dispose()
        self._engine = self._sessions = self._autocommit = None


def _create_engine(url: str, settings: Settings) -> AsyncEngine:
    if url.startswith("sqlite"):
        Path(make_url(url).database or "").parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # No pre-ping: it costs a round trip per checkout on every request. A connection that
    # died with its server fails one request (503, Retry-After) and is then replaced.
    engine = create_async_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_timeout=settings.database_pool_timeout,
        pool_recycle=1800,
        connect_args=bounds(settings),
    )
    event.listen(engine.sync_engine, "handle_error", _drop_interrupted)
    event.listen(engine.sync_engine, "handle_error", _count_error)
    return engine


def _count_error(context: ExceptionContext) -> None:
    """Count a failed statement or connection attempt: unavailable (down, hung) or error."""
    error = context.sqlalchemy_exception or context.original_exception
    metrics.database_error("unavailable" if unavailable_reason(error) else "error")


def _drop_interrupted(context: ExceptionContext) -> None:
    """Close a connection whose statement timed out or was cancelled, at once.

    Its reply may still come, so it is never reused: SQLAlchemy discards it anyway, but
    closes it gracefully first, which waits up to 2 s more for a server that does not
    answer.
    """
    if not isinstance(context.original_exception, TimeoutError | asyncio.CancelledError):
        return
    connection = context.connection
    if connection is None or connection.closed or connection.invalidated:
        return
    driver = connection.connection.driver_connection
    if driver is not None:
        driver.terminate()
    context.is_disconnect = True


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    cursor = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()

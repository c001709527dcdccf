"""The SQLAlchemy async engine and session factory, one per worker process."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from service.config import Settings


def database_url(settings: Settings) -> str:
    """Return the async driver URL: asyncpg for PostgreSQL, aiosqlite for the embedded file."""
    if settings.database_url is None:
        path = (settings.instance_dir / "dev.sqlite3").resolve()
        return f"sqlite+aiosqlite:///{path}"
    url = make_url(settings.database_url)
    if url.drivername in {"postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2"}:
        url = url.set(drivername="postgresql+asyncpg")
    return url.render_as_string(hide_password=False)


class Database:
    """Owns the pooled engine of the current process; created lazily, never in a parent."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._pid: int | None = None

    @property
    def url(self) -> str:
        """The driver URL this database connects to."""
        return database_url(self._settings)

    @property
    def engine(self) -> AsyncEngine:
        """Return this process's engine, creating it on first use."""
        if self._engine is None or self._pid != os.getpid():
            self._engine = _create_engine(self.url, self._settings.database_pool_size)
            self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)
            self._pid = os.getpid()
        return self._engine

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """Yield a session in a transaction, committed on success and rolled back on error."""
        self.engine  # noqa: B018 - makes sure the factory exists in this process
        assert self._sessions is not None
        async with self._sessions() as session, session.begin():
            yield session

    async def ping(self) -> None:
        """Run a trivial query; raises when the database does not answer."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        """Close every pooled connection of this process."""
        if self._engine is not None and self._pid == os.getpid():
            await self._engine.dispose()
        self._engine = self._sessions = None


def _create_engine(url: str, pool_size: int) -> AsyncEngine:
    if url.startswith("sqlite"):
        Path(make_url(url).database or "").parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # No pre-ping: it costs a round trip per checkout on every request. A connection that
    # died with its server fails one request (503, Retry-After) and is then replaced.
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": "authsvc"}},
    )


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    cursor = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()

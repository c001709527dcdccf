"""Tables of the service: users, login sessions and durable revocations."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    FetchedValue,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.ids import uuid7

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    """The current time, timezone-aware; the one clock the store uses."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base with deterministic constraint names for migrations."""

    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    """A first-party account; the password hash never leaves the store layer."""

    __tablename__ = "users"
    # A unique index rather than a constraint: PostgreSQL builds one without blocking writes.
    __table_args__ = (Index("uq_users_email_key", "email_key", unique=True),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    username: Mapped[str] = mapped_column(String(64))
    username_key: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    password_changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Logout-all and password changes end browser sign-ins made before this moment.
    sessions_valid_after: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Optional; unique under its lower-cased form, as usernames are under theirs.
    email: Mapped[str | None] = mapped_column(String(254))
    email_key: Mapped[str | None] = mapped_column(String(254))
    # A disabled account cannot sign in; its tokens were revoked when it was disabled.
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class LoginSession(Base):
    """One login: every token issued from it shares its id (the sid claim)."""

    __tablename__ = "login_sessions"
    __table_args__ = (Index("ix_login_sessions_user_open", "user_id", "revoked_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    refresh_jti: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_reason: Mapped[str | None] = mapped_column(String(32))


class Revocation(Base):
    """A durable revocation: the source of truth the Redis blocklist is rebuilt from."""

    __tablename__ = "revocations"
    __table_args__ = (
        Index("ix_revocations_expires_at", "expires_at"),
        Index("ix_revocations_seq", "seq"),
        Index("ix_revocations_user_group_seq", "user_group", "seq"),
    )

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    subject: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    cutoff_ms: Mapped[int | None] = mapped_column(BigInteger())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # PostgreSQL numbers every write from a sequence; Redis keeps the highest number it
    # holds, so a Redis that lost writes shows it (see blocklist.py). NULL on SQLite.
    seq: Mapped[int | None] = mapped_column(BigInteger(), server_default=FetchedValue())
    # The user (sub) of the tokens it covers, and that user's group (groups.py), which
    # places it on a Redis Cluster. NULL where unknown (rows recorded before they were
    # kept, some OAuth grants): such a row is loaded into every group.
    user_id: Mapped[str | None] = mapped_column(String(64))
    user_group: Mapped[int | None] = mapped_column(SmallInteger())


class UnwrittenRevocations(Base):
    """Recorded revocations Redis may lack: a blocklist write failed after their commit.

    Every worker's verification reads these marks, writes back every active revocation
    numbered above after_seq in those groups of users, then drops the marks it wrote back
    (Store.recover): a worker cut off from Redis, or a command that exited, leaves nothing
    only it would remember.
    """

    __tablename__ = "unwritten_revocations"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    after_seq: Mapped[int] = mapped_column(BigInteger())
    # The groups' numbers, space-separated (groups.py); every group where a user was unknown.
    user_groups: Mapped[str] = mapped_column(Text())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

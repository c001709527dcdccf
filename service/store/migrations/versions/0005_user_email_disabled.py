"""users.email (unique regardless of case) and users.disabled_at

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

Safe on a live table. The three columns are nullable without a default, so adding them
changes only the catalog; but ALTER TABLE still needs a moment's exclusive lock, and a
request for it waiting behind a long transaction would hold up every query queued after
it. So each attempt waits at most LOCK_TIMEOUT for the lock, then gives way and tries
again. The unique index is built CONCURRENTLY, outside the transaction, so writes go on
while it builds; a run that stopped half-way is simply run again.
"""

import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.exc import DBAPIError

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOCK_TIMEOUT = "2s"
LOCK_ATTEMPTS = 15
LOCK_NOT_AVAILABLE = "55P03"
INDEX = "uq_users_email_key"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("users") as batch:
            batch.add_column(sa.Column("email", sa.String(length=254), nullable=True))
            batch.add_column(sa.Column("email_key", sa.String(length=254), nullable=True))
            batch.add_column(sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True))
        op.create_index(INDEX, "users", ["email_key"], unique=True)
        return
    _with_short_lock_waits(
        "ALTER TABLE users ADD COLUMN IF NOT EXISTS email varchar(254), "
        "ADD COLUMN IF NOT EXISTS email_key varchar(254), "
        "ADD COLUMN IF NOT EXISTS disabled_at timestamp with time zone"
    )
    with op.get_context().autocommit_block():
        # An index left INVALID by an interrupted build would otherwise be kept as it is.
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
        op.execute(f"CREATE UNIQUE INDEX CONCURRENTLY {INDEX} ON users (email_key)")


def _with_short_lock_waits(statement: str) -> None:
    """Run statement in a savepoint, retried while its lock is not granted in time."""
    bind = op.get_bind()
    bind.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            with bind.begin_nested():
                bind.exec_driver_sql(statement)
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            if attempt == LOCK_ATTEMPTS:
                raise
            time.sleep(min(0.1 * 2**attempt, 5.0))
        else:
            break
    bind.exec_driver_sql("SET LOCAL lock_timeout = 0")


def downgrade() -> None:
    op.drop_index(INDEX, table_name="users")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("disabled_at")
        batch.drop_column("email_key")
        batch.drop_column("email")

"""revocations.user_id and revocations.user_group: where a revocation goes on a Redis Cluster

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04

Safe on a live table, as 0005 is: both columns are nullable without a default (a catalog
change only), each attempt at the ALTER TABLE's lock waits at most LOCK_TIMEOUT before it
gives way and tries again, and the index is built CONCURRENTLY. Rows recorded before keep
NULL: on a Redis Cluster they are loaded into every group, until they expire.
"""

import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.exc import DBAPIError

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOCK_TIMEOUT = "2s"
LOCK_ATTEMPTS = 15
LOCK_NOT_AVAILABLE = "55P03"
INDEX = "ix_revocations_user_group_seq"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("revocations") as batch:
            batch.add_column(sa.Column("user_id", sa.String(length=64), nullable=True))
            batch.add_column(sa.Column("user_group", sa.SmallInteger(), nullable=True))
        op.create_index(INDEX, "revocations", ["user_group", "seq"])
        return
    _with_short_lock_waits(
        "ALTER TABLE revocations ADD COLUMN IF NOT EXISTS user_id varchar(64), "
        "ADD COLUMN IF NOT EXISTS user_group smallint"
    )
    with op.get_context().autocommit_block():
        # An index left INVALID by an interrupted build would otherwise be kept as it is.
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
        op.execute(f"CREATE INDEX CONCURRENTLY {INDEX} ON revocations (user_group, seq)")


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
    op.drop_index(INDEX, table_name="revocations")
    with op.batch_alter_table("revocations") as batch:
        batch.drop_column("user_group")
        batch.drop_column("user_id")

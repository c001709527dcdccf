"""revocations.seq: the order revocations were recorded in, compared with Redis's copy

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.schema.CreateSequence(sa.Sequence("revocation_seq")))
        default = sa.text("nextval('revocation_seq')")
        op.add_column(
            "revocations", sa.Column("seq", sa.BigInteger(), nullable=False, server_default=default)
        )
        op.execute("ALTER SEQUENCE revocation_seq OWNED BY revocations.seq")
    else:
        # The embedded development database keeps revocations in process memory, unordered.
        with op.batch_alter_table("revocations") as batch:
            batch.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
    op.create_index("ix_revocations_seq", "revocations", ["seq"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_revocations_seq", table_name="revocations")
    with op.batch_alter_table("revocations") as batch:
        batch.drop_column("seq")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.schema.DropSequence(sa.Sequence("revocation_seq"), if_exists=True))

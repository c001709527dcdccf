"""unwritten_revocations: marks of recorded revocations a failed blocklist write may have lost

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

A new, empty table: nothing existing is locked or rewritten.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "unwritten_revocations",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("after_seq", sa.BigInteger(), nullable=False),
        sa.Column("user_groups", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_unwritten_revocations")),
    )


def downgrade() -> None:
    op.drop_table("unwritten_revocations")

"""users.sessions_valid_after (logout-all ends browser sign-ins), oauth_clients.resource_server

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("sessions_valid_after", sa.DateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("oauth_clients") as batch:
        batch.add_column(
            sa.Column("resource_server", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("oauth_clients") as batch:
        batch.drop_column("resource_server")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("sessions_valid_after")

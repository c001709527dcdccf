"""Schema migrations (Alembic), applied by `python -m service migrate`."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from service.config import Settings
from service.store.db import bounds, database_url

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


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
    command.upgrade(alembic_config(settings), revision)

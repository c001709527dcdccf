"""Run `python -m service ...` as an operator would, against the test backends."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

from service.config import Settings
from tests.servers import ROOT


def cli_environment(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment of a command run on settings' database, Redis and key prefix."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SERVICE_ENV": "production",
        "DATABASE_URL": str(settings.database_url),
        "REDIS_URL": str(settings.redis_url),
        "REDIS_PREFIX": settings.redis_prefix,
        "SECRET_KEY": str(settings.secret_key),
        "JWT_ISSUER": settings.jwt_issuer,
        "JWT_SECRET": str(settings.jwt_secret),
        "PASSWORD_MEMORY_KIB": "7168",
        "PASSWORD_TIME_COST": "1",
        **overrides,
    }


def run_cli(
    settings: Settings, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run one command to its end; its output is captured."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=cli_environment(settings, **env),
        timeout=60,
        check=False,
    )


async def run_cli_async(
    settings: Settings, *args: str, **options: Any
) -> subprocess.CompletedProcess[str]:
    """run_cli off the event loop, so an in-process app keeps serving meanwhile."""
    return await asyncio.to_thread(run_cli, settings, *args, **options)

"""Command line: `python -m service serve|migrate|wait|users|clients|keys`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from service.config import (
    DEV_ISSUER,
    ConfigError,
    DatabaseUnavailable,
    Settings,
    load_settings,
)
from service.logs import configure as configure_logs

log = logging.getLogger("service")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one command; returns the exit status."""
    args = _parser().parse_args(argv)
    if getattr(args, "dev", False):
        os.environ["SERVICE_ENV"] = "development"
    try:
        settings = load_settings()
        configure_logs(settings)
        return int(args.func(args, settings))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except DatabaseUnavailable as exc:
        print(f"database unavailable: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from service.store.db import unavailable_reason

        reason = unavailable_reason(exc)
        if reason is None:
            raise
        print(f"database unavailable: {reason}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTPS server (Hypercorn)")
    serve.add_argument("--bind", action="append", help="address:port to listen on (repeatable)")
    serve.add_argument("--workers", type=int, help="worker processes (default: hypercorn.toml)")
    serve.add_argument("--config", type=Path, help="Hypercorn TOML file (default: hypercorn.toml)")
    serve.add_argument("--dev", action="store_true", help="development mode: embedded defaults")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument(
        "--proxy-only",
        action="store_true",
        help="serve plain HTTP on PROXY_BIND alone, for a TLS-terminating ingress (no TLS "
        "listener, no certificate)",
    )
    serve.set_defaults(func=_serve)

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--revision", default="head")
    migrate.add_argument("--dev", action="store_true", help="development mode: embedded defaults")
    migrate.set_defaults(func=_migrate)

    wait = commands.add_parser("wait", help="wait until PostgreSQL and Redis answer")
    wait.add_argument("--timeout", type=float, default=60.0, help="seconds before giving up")
    wait.set_defaults(func=_wait)

    from service.auth.cli import add_commands as add_user_commands
    from service.oauth.cli import add_commands

    add_user_commands(commands)
    add_commands(commands)
    return parser


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from service.server import announce, hypercorn_config, serve

    announce(settings)
    if settings.embedded_database:
        _migrate(args, settings)
    config = hypercorn_config(
        settings,
        config_file=args.config,
        bind=args.bind,
        workers=args.workers,
        proxy_only=args.proxy_only,
    )
    if args.access_log:
        os.environ["ACCESS_LOG"] = "true"  # read by the workers (service/access.py)
    if settings.is_development and not _issuer_configured():
        # Workers read their settings from the environment: tell them too.
        tls_binds = [] if args.proxy_only else getattr(config, "bind", [])
        os.environ["JWT_ISSUER"] = development_issuer(tls_binds)
    return serve(config, settings)


def _issuer_configured() -> bool:
    return any(name.upper() == "JWT_ISSUER" for name in os.environ)


def development_issuer(binds: list[str]) -> str:
    """The https URL of the first address served, for a development run without JWT_ISSUER."""
    for bind in binds:
        host, colon, port = bind.rpartition(":")
        if not colon or not port.isdigit() or bind.startswith(("unix:", "fd://")):
            continue
        host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)  # noqa: S104
        return f"https://{host}:{port}"
    return DEV_ISSUER


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from service.store.migrate import upgrade

    upgrade(settings, getattr(args, "revision", "head"))
    log.info("database schema is up to date")
    return 0


def _wait(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_wait_async(settings, args.timeout))


async def _wait_async(settings: Settings, seconds: float) -> int:
    import time

    from service.loop import WorkerLoop
    from service.store import Store

    store = Store(settings, WorkerLoop())
    deadline = time.monotonic() + seconds
    delay = 0.5
    try:
        while True:
            try:
                await store.db.ping()
                if settings.redis_url is not None:
                    from service.store.redis_target import connect, parse_target

                    client = connect(parse_target(settings.redis_url), timeout=2)
                    try:
                        await client.ping()
                    finally:
                        await client.aclose()
                log.info("database and redis answer")
                return 0
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    log.error("backends did not answer within %.0fs: %s", seconds, exc)
                    return 1
                log.info("waiting for backends (%s)", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
    finally:
        await store.db.dispose()


if __name__ == "__main__":
    sys.exit(main())

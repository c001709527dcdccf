"""Running the service under Hypercorn: configuration checks, TLS, workers."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, cast

from service import close_app, create_app, transport, warm_up
from service.adapter import AsgiAdapter
from service.auth.passwords import hashing_lane
from service.auth.prefetch import revocation_prefetch
from service.binds import BindError, check_binds
from service.config import ConfigError, Settings, read_file
from service.exposition import MetricsListenerError, run_metrics
from service.hotpath import inline_policy
from service.isolation import database_policy
from service.oauth.prefetch import ClientPrefetch
from service.tls import TlsConfig, check_certificate, ensure_dev_certificate
from service.workers import run_workers

log = logging.getLogger("service")

APPLICATION_PATH = "service.asgi:app"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "hypercorn.toml"


def build_asgi_app(settings: Settings | None = None) -> AsgiAdapter:
    """The Flask app wrapped for ASGI, with its shutdown hook."""
    transport.install()
    flask_app = create_app(settings)
    settings = flask_app.extensions["settings"]
    clients = ClientPrefetch(settings, flask_app.extensions["oauth_keyring"])
    return AsgiAdapter(
        flask_app.wsgi_app,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.request_body_timeout,
        threads=settings.request_threads,
        inline=inline_policy(flask_app),
        prepare_inline=revocation_prefetch(flask_app),
        prefetch=clients,
        lane=hashing_lane(flask_app, settings),
        on_startup=lambda: warm_up(flask_app),
        on_shutdown=lambda: close_app(flask_app),
        on_loop_shutdown=clients.close,
        needs_database=database_policy(flask_app),
        database_slots=settings.database_request_slots,
        database_wait=settings.database_pool_timeout,
    )


def hypercorn_config(
    settings: Settings,
    *,
    config_file: Path | None = None,
    bind: list[str] | None = None,
    workers: int | None = None,
) -> object:
    """Build Hypercorn's Config from hypercorn.toml plus command-line overrides."""
    config = _load_config(config_file)
    config.application_path = APPLICATION_PATH
    if bind:
        config.bind = bind
    if workers is not None:
        config.workers = workers
    if config.workers < 1:
        raise ConfigError("workers must be at least 1")
    if config.errorlog == "-":
        # Hypercorn's own lines go through the service's handler and format (service/logs.py).
        config.errorlog = logging.getLogger("hypercorn.error")
    config.certfile, config.keyfile = (str(p) for p in _certificates(settings))
    if settings.embedded_blocklist and config.workers != 1:
        log.warning("in-process blocklist: running ONE worker (set REDIS_URL for more)")
        config.workers = 1
    return config


def _load_config(config_file: Path | None) -> TlsConfig:
    """Read the TOML file named (which must exist), else the repository's if there is one."""
    named = config_file or os.environ.get("HYPERCORN_CONFIG")
    if named is None and not DEFAULT_CONFIG.exists():
        return TlsConfig()  # an installed package: Hypercorn's defaults
    setting = "--config" if config_file else "HYPERCORN_CONFIG"
    path = Path(named) if named else DEFAULT_CONFIG
    try:
        read_file(setting, path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return cast(TlsConfig, TlsConfig.from_toml(path))
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise ConfigError(f"{setting} {path}: {exc}") from None


def _certificates(settings: Settings) -> tuple[Path, Path]:
    if settings.tls_cert_file and settings.tls_key_file:
        check_certificate(settings.tls_cert_file, settings.tls_key_file)
        return settings.tls_cert_file, settings.tls_key_file
    if not settings.is_development:
        raise ConfigError("production mode requires TLS_CERT_FILE and TLS_KEY_FILE")
    cert, key = ensure_dev_certificate(settings.instance_dir)
    log.warning("development TLS: self-signed certificate %s", cert)
    return cert, key


def announce(settings: Settings) -> None:
    """Say loudly what this process runs on, so nobody mistakes a dev setup for production."""
    if settings.embedded_database:
        log.warning(
            "DATABASE_URL not set: using embedded SQLite %s", settings.instance_dir / "dev.sqlite3"
        )
    if settings.embedded_blocklist:
        log.warning("REDIS_URL not set: revocations are kept in process memory (one worker)")
    if settings.is_development:
        log.warning(
            "DEVELOPMENT MODE: generated secrets in %s; never use this in production",
            settings.instance_dir,
        )


def serve(config: Any, settings: Settings) -> int:
    """Run the workers, each with its own sockets, until told to stop; the exit status."""
    try:
        check_binds(config)
        with run_metrics(settings):
            return run_workers(config)
    except (BindError, MetricsListenerError) as exc:
        log.error("%s", exc)
        return 1

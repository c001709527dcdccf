"""Running the service under Hypercorn: configuration checks, TLS, workers."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, cast

from service import access, create_app, start_app, stop_app, transport
from service.adapter import AsgiAdapter
from service.binds import BindError, check_binds, host_port
from service.config import ConfigError, Settings, load_settings, read_file
from service.exposition import MetricsListenerError, run_metrics
from service.isolation import database_policy
from service.tls import TlsConfig, check_certificate, ensure_dev_certificate
from service.transport.penalty_box import Policy
from service.workers import run_workers

log = logging.getLogger("service")

APPLICATION_PATH = "service.asgi:app"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "hypercorn.toml"


def build_asgi_app(settings: Settings | None = None) -> AsgiAdapter:
    """The Flask app wrapped for ASGI, with its shutdown hook."""
    settings = settings or load_settings()
    applied = transport.install(settings.library_change_names)
    flask_app = create_app(settings)
    settings = flask_app.extensions["settings"]
    if "verified_tokens" in flask_app.extensions:
        applied.append("verified_tokens")
    log.info("library changes applied: %s", ", ".join(applied) or "none")
    return AsgiAdapter(
        flask_app.wsgi_app,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.request_body_timeout,
        on_startup=lambda: start_app(flask_app),
        on_shutdown=lambda: stop_app(flask_app),
        needs_database=database_policy(flask_app),
        database_slots=settings.database_request_slots,
        database_wait=settings.database_pool_timeout,
        observe=access.server_answers(access_log=settings.logs_requests),
    )


def hypercorn_config(
    settings: Settings,
    *,
    config_file: Path | None = None,
    bind: list[str] | None = None,
    workers: int | None = None,
    proxy_only: bool = False,
) -> object:
    """Build Hypercorn's Config from hypercorn.toml plus command-line overrides.

    TLS is served on `bind`, plain HTTP/1.1 and h2c on PROXY_BIND (Hypercorn's
    insecure_bind); with proxy_only, PROXY_BIND alone, and no certificate is needed.
    """
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
    if config.insecure_bind:
        raise ConfigError("insecure_bind in the Hypercorn configuration: set PROXY_BIND instead")
    if proxy_only:
        _serve_proxy_only(config, settings, bind)
    else:
        config.certfile, config.keyfile = (str(p) for p in _certificates(settings))
        _check_separate(config.bind, settings.proxy_binds)
        config.insecure_bind = settings.proxy_binds
    config.penalty_policy = penalty_policy(settings)
    if settings.embedded_blocklist and config.workers != 1:
        log.warning("in-process blocklist: running ONE worker (set REDIS_URL for more)")
        config.workers = 1
    return config


def _serve_proxy_only(config: Any, settings: Settings, bind: list[str] | None) -> None:
    """Listen on PROXY_BIND alone, without TLS (Hypercorn serves bind in the clear then)."""
    if bind:
        raise ConfigError("--proxy-only serves PROXY_BIND alone: give no --bind")
    if not settings.proxy_binds:
        raise ConfigError("--proxy-only requires PROXY_BIND (the plain-HTTP address)")
    config.bind = settings.proxy_binds
    config.quic_bind = []
    config.certfile = config.keyfile = None


def _check_separate(tls_binds: list[str], proxy_binds: list[str]) -> None:
    """Refuse a PROXY_BIND that would share a port with a TLS address.

    With SO_REUSEPORT (more than one worker) both sockets would bind, and the kernel would
    hand TLS clients to the plain listener and the other way round.
    """
    for proxy in proxy_binds:
        for tls in tls_binds:
            if _overlap(proxy, tls):
                raise ConfigError(f"PROXY_BIND {proxy} and the TLS address {tls} share a port")


def _overlap(first: str, second: str) -> bool:
    """Whether two host:port addresses would receive the same connections."""
    if first.startswith(("unix:", "fd://")) or second.startswith(("unix:", "fd://")):
        return first == second
    (host_a, port_a), (host_b, port_b) = host_port(first), host_port(second)
    wildcard = {"", "0.0.0.0", "::"}  # noqa: S104
    return port_a == port_b and (host_a == host_b or host_a in wildcard or host_b in wildcard)


def penalty_policy(settings: Settings) -> Policy | None:
    """How each worker penalises addresses cut off for HTTP/2 abuse (None: it does not)."""
    if not settings.h2_abuse_penalty:
        return None
    return Policy(
        first=settings.h2_abuse_penalty,
        cap=settings.h2_abuse_penalty_max,
        addresses=settings.h2_abuse_penalty_addresses,
        exempt=settings.trusted_networks,
    )


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
    if settings.proxy_binds and not settings.trusted_proxies:
        log.warning(
            "PROXY_BIND without TRUSTED_PROXIES: X-Forwarded-* are ignored, and every "
            "request through the proxy counts as the proxy's address at the sign-in limits"
        )
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

"""Typed settings read from the environment, validated once at start-up."""

from __future__ import annotations

import ipaddress
import secrets
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = {
    "",
    "secret",
    "changeme",
    "change-me",
    "change_me",
    "password",
    "dev",
    "test",
}
MIN_SECRET_BYTES = 32
# Development's issuer when neither JWT_ISSUER nor `serve --dev --bind` says otherwise.
DEV_ISSUER = "https://127.0.0.1:8443"
# The speed-ups service/transport/ makes to library internals, as LIBRARY_CHANGES names them
# (docs/performance.md keeps a record of each), in the order they are applied.
TRANSPORT_CHANGES = (
    "hpack_memo",
    "h2_headers",
    "coalesce",
)
# And the one in Flask-JWT-Extended: each token's signature verified once (auth/verified.py).
PERFORMANCE_CHANGES = (*TRANSPORT_CHANGES, "verified_tokens")


class Environment(StrEnum):
    """Where the service runs: development allows embedded defaults, production does not."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


class ConfigError(RuntimeError):
    """The configuration cannot run safely; the message says what to set."""


class DatabaseUnavailable(RuntimeError):
    """The configured database cannot be reached or used; the message says why, in one line."""


def _default_instance_dir() -> Path:
    """The source checkout's instance folder; for an installed package, ./instance."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout / "instance" if (checkout / "pyproject.toml").exists() else Path("instance")


class Settings(BaseSettings):
    """Every knob of the service; secrets have no working default outside development."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    service_env: Environment = Environment.PRODUCTION
    # Development's files (SQLite, secrets, certificate): the checkout's instance folder,
    # whatever directory a command runs from.
    instance_dir: Path = Field(default_factory=_default_instance_dir)

    database_url: str | None = None
    database_pool_size: int = Field(default=10, ge=1, le=200)
    # Bounds on every PostgreSQL call, in seconds: a hung server (a stopped process, a
    # network black hole) costs a request at most these, then a 503 with Retry-After.
    # Opening a connection, start-up and authentication included:
    database_connect_timeout: float = Field(default=3.0, gt=0, le=60)
    # One statement or commit; PostgreSQL is given the same (statement_timeout), so it
    # stops work the service gave up on. Migrations are not bound by it.
    database_statement_timeout: float = Field(default=5.0, gt=0, le=600)
    # Waiting for a pooled connection, or for a turn among DATABASE_MAX_REQUESTS:
    database_pool_timeout: float = Field(default=2.0, gt=0, le=60)
    # Requests of one worker that may wait on the database at once (default: as many as
    # the pool holds; its overflow serves start-up, maintenance and the CLI), so that a
    # hung database cannot pile up the rest.
    database_max_requests: int | None = Field(default=None, ge=1, le=256)
    redis_url: str | None = None
    redis_prefix: str = "authsvc:"
    redis_timeout: float = Field(default=0.5, gt=0, le=30)

    secret_key: str | None = None
    # Earlier SECRET_KEYs, comma-separated, still accepted while SECRET_KEY changes: for
    # browser sign-in cookies, and to unseal signing keys until `keys reseal` has run.
    secret_key_fallbacks: str = ""
    jwt_secret: str | None = None
    # Earlier JWT_SECRETs, comma-separated: first-party tokens they signed stay valid while
    # JWT_SECRET changes (HS256 only).
    jwt_secret_fallbacks: str = ""
    jwt_algorithm: Literal["HS256", "RS256", "ES256"] = "HS256"
    jwt_private_key_file: Path | None = None
    jwt_public_key_file: Path | None = None
    # Public keys of earlier JWT_PRIVATE_KEY_FILEs, comma-separated paths: first-party
    # tokens they signed stay valid while the key changes (RS256/ES256 only).
    jwt_public_key_fallback_files: str = ""
    # The service's own https URL (RFC 8414 issuer): the metadata's base and every token's
    # iss. Required in production; development defaults to DEV_ISSUER, or to the first
    # address `serve --dev --bind` names.
    jwt_issuer: str = ""
    jwt_audience: str = "authsvc"
    access_token_ttl: int = Field(default=900, ge=30, le=86400)
    refresh_token_ttl: int = Field(default=30 * 86400, ge=300, le=400 * 86400)
    default_scopes: str = "profile email"
    # Whether anyone may create an account at /auth/register; `users create` always may.
    registration_open: bool = True

    verified_token_memo: int = Field(default=8192, ge=0, le=1_000_000)
    revocation_check: bool = True
    revocation_propagation_ms: int = Field(default=200, ge=0, le=1000)
    revocation_shards: int = Field(default=256, ge=1, le=65536)
    revocation_bucket_seconds: int = Field(default=60, ge=1, le=3600)
    revocation_session_bucket_seconds: int = Field(default=3600, ge=1, le=86400)

    password_time_cost: int = Field(default=2, ge=1)
    password_memory_kib: int = Field(default=19456, ge=7168)
    password_parallelism: int = Field(default=1, ge=1)
    password_hash_threads: int = Field(default=1, ge=1, le=64)
    password_hash_nice: int = Field(default=10, ge=0, le=19)
    # Requests that hash a password (login, register, password change, the OAuth login
    # page), per worker, running or waiting; past it, 503 with Retry-After at once.
    password_queue_limit: int = Field(default=64, ge=1, le=4096)

    # Failed sign-ins are counted in Redis for THROTTLE_WINDOW seconds from the first one;
    # past a limit, attempts are answered 429 until that window ends.
    throttle_window: int = Field(default=900, ge=1, le=86400)
    login_failures_per_pair: int = Field(default=5, ge=1)  # one account from one address
    login_failures_per_account: int = Field(default=50, ge=1)  # from addresses new to it
    login_failures_per_address: int = Field(default=100, ge=1)  # any accounts, one address
    # How long an address that signed in to an account stays exempt from that account's limit.
    login_known_address_ttl: int = Field(default=30 * 86400, ge=60, le=400 * 86400)
    client_failures_per_client: int = Field(default=20, ge=1)  # OAuth client authentication
    client_failures_per_address: int = Field(default=100, ge=1)

    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    request_body_timeout: float = Field(default=60.0, gt=0, le=3600)
    redis_pool_size: int = Field(default=24, ge=1, le=1024)
    # An address whose HTTP/2 connection was cut for abuse (GOAWAY ENHANCE_YOUR_CALM) has
    # its new connections reset at accept, before TLS, for H2_ABUSE_PENALTY seconds (0: off),
    # doubled for each further offence up to H2_ABUSE_PENALTY_MAX; per worker, for at most
    # H2_ABUSE_PENALTY_ADDRESSES addresses (IPv4, IPv6 /64). Off behind a load balancer.
    h2_abuse_penalty: float = Field(default=1.0, ge=0, le=3600)
    h2_abuse_penalty_max: float = Field(default=60.0, gt=0, le=86400)
    h2_abuse_penalty_addresses: int = Field(default=4096, ge=1, le=1_000_000)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Plain HTTP/1.1 and h2c for a TLS-terminating ingress: host:port addresses, comma
    # separated, served beside the TLS listener (or alone, with `serve --proxy-only`).
    proxy_bind: str = ""
    # Addresses and networks (comma separated) whose X-Forwarded-For/Proto/Host are
    # believed; empty: nobody's.
    trusted_proxies: str = ""
    expose_worker_id: bool = False
    # Which PERFORMANCE_CHANGES to apply: "all", "none" (stock Hypercorn, h2 and hpack), or
    # a comma list of names. The HTTP/2 abuse guard is a security fix: always applied.
    library_changes: str = "all"

    # Logs (service/logs.py): JSON lines unless development; LOG_LEVEL is the service's own
    # loggers' level (libraries stay at INFO: their DEBUG lines can carry header values).
    log_format: Literal["json", "text"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool | None = None  # default: on in production, off in development
    # Metrics (service/exposition.py): never on the public port unless METRICS_PUBLIC.
    metrics_bind: str | None = None  # host:port of the master's plain-HTTP listener
    metrics_public: bool = False  # also serve GET /metrics on the main port, behind...
    metrics_token: str | None = None  # ...this bearer secret

    @property
    def is_development(self) -> bool:
        """Whether embedded defaults and generated secrets are allowed."""
        return self.service_env is Environment.DEVELOPMENT

    @property
    def secret_keys(self) -> list[str]:
        """SECRET_KEY, then each of SECRET_KEY_FALLBACKS: what seals first, what still opens."""
        return [self.secret_key or "", *_split(self.secret_key_fallbacks)]

    @property
    def jwt_public_key_fallbacks(self) -> list[Path]:
        """JWT_PUBLIC_KEY_FALLBACK_FILES: public keys of earlier first-party signing keys."""
        return [Path(path) for path in _split(self.jwt_public_key_fallback_files)]

    @property
    def jwt_secrets(self) -> list[str]:
        """JWT_SECRET, then each of JWT_SECRET_FALLBACKS: what signs first, what still verifies."""
        return [self.jwt_secret or "", *_split(self.jwt_secret_fallbacks)]

    @property
    def json_logs(self) -> bool:
        """Whether log lines are JSON objects (LOG_FORMAT; json unless development)."""
        return self.log_format == "json" if self.log_format else not self.is_development

    @property
    def logs_requests(self) -> bool:
        """Whether every request gets an access-log line (ACCESS_LOG; on unless development)."""
        return self.access_log if self.access_log is not None else not self.is_development

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """METRICS_BIND as (host, port), or None when there is no metrics listener."""
        return _parse_bind(self.metrics_bind) if self.metrics_bind else None

    @property
    def database_request_slots(self) -> int:
        """How many requests may wait on the database at once (DATABASE_MAX_REQUESTS)."""
        if self.database_max_requests is not None:
            return self.database_max_requests
        return self.database_pool_size

    @property
    def library_change_names(self) -> frozenset[str]:
        """The performance changes LIBRARY_CHANGES selects."""
        return parse_library_changes(self.library_changes)

    @property
    def embedded_database(self) -> bool:
        """Whether the service falls back to the development SQLite file."""
        return self.database_url is None

    @property
    def embedded_blocklist(self) -> bool:
        """Whether revocations live in process memory (development, one worker only)."""
        return self.redis_url is None

    @field_validator("jwt_issuer")
    @classmethod
    def _issuer_is_an_https_url(cls, value: str) -> str:
        if value:
            _check_issuer(value)
        return value

    @property
    def proxy_binds(self) -> list[str]:
        """The plain-HTTP listening addresses PROXY_BIND names."""
        return _split(self.proxy_bind)

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The networks TRUSTED_PROXIES names."""
        return tuple(ipaddress.ip_network(entry) for entry in _split(self.trusted_proxies))

    @field_validator("proxy_bind")
    @classmethod
    def _proxy_binds_are_host_port(cls, value: str) -> str:
        for bind in _split(value):
            _check_bind("PROXY_BIND", bind)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies_are_networks(cls, value: str) -> str:
        for entry in _split(value):
            try:
                ipaddress.ip_network(entry)
            except ValueError as exc:
                raise ValueError(
                    f"TRUSTED_PROXIES: {exc} (an address such as 10.0.0.7, or a network "
                    "such as 10.0.0.0/8, without host bits)"
                ) from None
        return value

    @field_validator("library_changes")
    @classmethod
    def _library_changes_are_known(cls, value: str) -> str:
        parse_library_changes(value)
        return value.strip().lower()

    @field_validator("metrics_bind")
    @classmethod
    def _metrics_bind_parses(cls, value: str | None) -> str | None:
        if value:
            _parse_bind(value)
        return value or None

    @field_validator("database_url")
    @classmethod
    def _database_url_parses(cls, value: str | None) -> str | None:
        if value is not None:
            _check_database_url(value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_parses(cls, value: str | None) -> str | None:
        if value is not None:
            _check_redis_url(value)
        return value

    @model_validator(mode="after")
    def _prefix_suits_a_cluster(self) -> Settings:
        if self.redis_url is not None and ("{" in self.redis_prefix or "}" in self.redis_prefix):
            from service.store.redis_target import Topology, parse_target

            if parse_target(self.redis_url).topology is Topology.CLUSTER:
                # Braces would become the keys' hash tag and put every key in one slot.
                raise ValueError("REDIS_PREFIX may not hold { or } with a Redis Cluster")
        return self

    @model_validator(mode="after")
    def _jwt_fallbacks_suit_the_algorithm(self) -> Settings:
        if self.jwt_algorithm != "HS256" and self.jwt_secrets[1:]:
            raise ValueError("JWT_SECRET_FALLBACKS applies to JWT_ALGORITHM=HS256 only")
        if self.jwt_algorithm == "HS256" and self.jwt_public_key_fallbacks:
            raise ValueError("JWT_PUBLIC_KEY_FALLBACK_FILES applies to RS256 and ES256 only")
        return self

    @model_validator(mode="after")
    def _key_files_are_readable(self) -> Settings:
        if self.jwt_algorithm != "HS256":
            if self.jwt_private_key_file is not None:
                _check_pem_key("JWT_PRIVATE_KEY_FILE", self.jwt_private_key_file, private=True)
            if self.jwt_public_key_file is not None:
                _check_pem_key("JWT_PUBLIC_KEY_FILE", self.jwt_public_key_file, private=False)
            for path in self.jwt_public_key_fallbacks:
                _check_pem_key("JWT_PUBLIC_KEY_FALLBACK_FILES", path, private=False)
        return self

    @model_validator(mode="after")
    def _check_throttle_limits(self) -> Settings:
        pair = self.login_failures_per_pair
        if pair > self.login_failures_per_account or pair > self.login_failures_per_address:
            raise ValueError(
                "LOGIN_FAILURES_PER_PAIR must not exceed LOGIN_FAILURES_PER_ACCOUNT or "
                "LOGIN_FAILURES_PER_ADDRESS: the per-pair limit is the strict one"
            )
        return self

    @model_validator(mode="after")
    def _check_penalty_cap(self) -> Settings:
        if self.h2_abuse_penalty > self.h2_abuse_penalty_max:
            raise ValueError("H2_ABUSE_PENALTY must not exceed H2_ABUSE_PENALTY_MAX")
        return self

    @model_validator(mode="after")
    def _require_production_settings(self) -> Settings:
        if self.is_development:
            self.jwt_issuer = self.jwt_issuer or DEV_ISSUER
            return self
        if not self.revocation_check:
            raise ValueError("REVOCATION_CHECK=false exists for benchmarks: development mode only")
        missing = [
            name
            for name, value in (
                ("DATABASE_URL", self.database_url),
                ("REDIS_URL", self.redis_url),
                ("SECRET_KEY", self.secret_key),
            )
            if not value
        ]
        if self.jwt_algorithm == "HS256" and not self.jwt_secret:
            missing.append("JWT_SECRET")
        if self.jwt_algorithm != "HS256" and not self.jwt_private_key_file:
            missing.append("JWT_PRIVATE_KEY_FILE")
        if not self.jwt_issuer:
            missing.append("JWT_ISSUER")
        if self.metrics_public and not self.metrics_token:
            missing.append("METRICS_TOKEN (for METRICS_PUBLIC)")
        if missing:
            raise ValueError(
                "production mode requires "
                + ", ".join(missing)
                + " (or set SERVICE_ENV=development for a local run)"
            )
        for name, value in (
            ("SECRET_KEY", self.secret_key),
            ("JWT_SECRET", self.jwt_secret),
            ("METRICS_TOKEN", self.metrics_token),
            *(("SECRET_KEY_FALLBACKS", fallback) for fallback in self.secret_keys[1:]),
            *(("JWT_SECRET_FALLBACKS", fallback) for fallback in self.jwt_secrets[1:]),
        ):
            if value is not None:
                _check_secret_strength(name, value)
        return self


def _split(value: str) -> list[str]:
    """The entries of a comma-separated setting, without blanks."""
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def _check_bind(setting: str, bind: str) -> None:
    """Refuse a listening address that is not host:port (IPv6 as [address]:port)."""
    host, colon, port = bind.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        family_ok = ":" in host
    else:
        family_ok = ":" not in host
    if not colon or not port.isdigit() or not 0 < int(port) < 65536 or not host or not family_ok:
        raise ValueError(
            f"{setting}: {bind!r} is not host:port (for example 0.0.0.0:8080 or [::]:8080)"
        )


def parse_library_changes(value: str) -> frozenset[str]:
    """The performance changes a LIBRARY_CHANGES value names (ValueError if it names others)."""
    value = value.strip().lower()
    if value == "all":
        return frozenset(PERFORMANCE_CHANGES)
    if value == "none":
        return frozenset()
    names = {name.strip() for name in value.split(",")}
    unknown = sorted(names - set(PERFORMANCE_CHANGES))
    if unknown:
        raise ValueError(
            f"LIBRARY_CHANGES names unknown changes {unknown}: use all, none, or a comma list "
            f"of {', '.join(PERFORMANCE_CHANGES)}"
        )
    return frozenset(names)


def _check_secret_strength(name: str, value: str) -> None:
    """Refuse placeholder or short secrets: HS256 needs at least 256 bits."""
    if value.strip().lower() in PLACEHOLDER_SECRETS or len(value.encode()) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{name} must be a random value of at least {MIN_SECRET_BYTES} bytes "
            "(for example: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )


def _check_issuer(value: str) -> None:
    """Refuse an issuer that is not an https URL without query or fragment (RFC 8414 2)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"JWT_ISSUER is not a URL: {exc}") from exc
    if (
        parts.scheme != "https"
        or not parts.hostname
        or parts.username is not None
        or "?" in value
        or "#" in value
        or " " in value
        or not value.isprintable()
    ):
        raise ValueError(
            "JWT_ISSUER must be the service's https URL, without query or fragment "
            "(for example https://auth.example.com)"
        )


def _parse_bind(value: str) -> tuple[str, int]:
    """host:port (an IPv6 host in brackets) as (host, port), or a ValueError saying why not."""
    host, colon, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("METRICS_BIND must be host:port, such as 127.0.0.1:9464")
    return host, int(port)


def read_file(setting: str, path: Path) -> bytes:
    """A configured file's bytes, or a ValueError naming the setting, the file and why not."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting} {path}: {exc.strerror or exc}") from None


def _check_pem_key(setting: str, path: Path, *, private: bool) -> None:
    """Refuse a key file that cannot be read or holds no unencrypted PEM key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = read_file(setting, path)
    try:
        if private:
            serialization.load_pem_private_key(data, password=None)
        else:
            serialization.load_pem_public_key(data)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        kind = "private" if private else "public"
        raise ValueError(f"{setting} {path}: not an unencrypted PEM {kind} key") from None


def _check_database_url(value: str) -> None:
    """Refuse a DATABASE_URL that cannot be parsed, before anything tries to connect."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
        port = url.port
    except (ArgumentError, ValueError):
        raise ValueError(
            "DATABASE_URL is not a database URL "
            "(for example postgresql://user:password@host:5432/authsvc)"
        ) from None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"DATABASE_URL has port {port}, outside 1-65535")


def _check_redis_url(value: str) -> None:
    """Refuse a REDIS_URL that redis-py would refuse, or read other than it says."""
    from service.store.redis_target import parse_target

    try:
        parse_target(value)
    except ValueError as exc:
        raise ValueError(f"REDIS_URL is not usable: {exc}") from None


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (plus overrides), raising ConfigError when unsafe."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    if settings.is_development:
        settings = _fill_development_secrets(settings)
    return settings


def _describe(exc: ValidationError) -> str:
    """One line naming each refused setting, never echoing a value (it may be a secret)."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        cause = (error.get("ctx") or {}).get("error")
        message = str(cause) if cause is not None else error["msg"]
        names = ".".join(str(part) for part in error["loc"]).upper()
        problems.append(f"{names}: {message}" if names and names not in message else message)
    return "; ".join(problems)


def _fill_development_secrets(settings: Settings) -> Settings:
    """Give development a stable generated secret, kept in the instance folder."""
    updates: dict[str, Any] = {}
    if not settings.secret_key:
        updates["secret_key"] = _instance_secret(settings.instance_dir / "dev-secret-key")
    if settings.jwt_algorithm == "HS256" and not settings.jwt_secret:
        updates["jwt_secret"] = _instance_secret(settings.instance_dir / "dev-jwt-secret")
    if settings.metrics_public and not settings.metrics_token:
        updates["metrics_token"] = _instance_secret(settings.instance_dir / "dev-metrics-token")
    return settings.model_copy(update=updates) if updates else settings


def _instance_secret(path: Path) -> str:
    """Read a secret from path, creating it (mode 0600) on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    path.touch(mode=0o600)
    path.write_text(value)
    return value

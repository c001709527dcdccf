"""Typed settings read from the environment, validated once at start-up."""

from __future__ import annotations

import secrets
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
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


class Environment(StrEnum):
    """Where the service runs: development allows embedded defaults, production does not."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


class ConfigError(RuntimeError):
    """The configuration cannot run safely; the message says what to set."""


class Settings(BaseSettings):
    """Every knob of the service; secrets have no working default outside development."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    service_env: Environment = Environment.PRODUCTION
    instance_dir: Path = Path("instance")

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
    # Requests of one worker that may wait on the database at once (default: all request
    # threads but 4), so that requests needing none are served while it hangs.
    database_max_requests: int | None = Field(default=None, ge=1, le=256)
    redis_url: str | None = None
    redis_prefix: str = "authsvc:"
    redis_timeout: float = Field(default=0.5, gt=0, le=30)

    secret_key: str | None = None
    jwt_secret: str | None = None
    jwt_algorithm: Literal["HS256", "RS256", "ES256"] = "HS256"
    jwt_private_key_file: Path | None = None
    jwt_public_key_file: Path | None = None
    jwt_issuer: str = "authsvc"
    jwt_audience: str = "authsvc"
    access_token_ttl: int = Field(default=900, ge=30, le=86400)
    refresh_token_ttl: int = Field(default=30 * 86400, ge=300, le=400 * 86400)
    default_scopes: str = "profile email"

    verified_token_memo: int = Field(default=8192, ge=0, le=1_000_000)
    revocation_check: bool = True
    revocation_propagation_ms: int = Field(default=50, ge=0, le=1000)
    revocation_shards: int = Field(default=256, ge=1, le=65536)
    revocation_bucket_seconds: int = Field(default=60, ge=1, le=3600)
    revocation_session_bucket_seconds: int = Field(default=3600, ge=1, le=86400)

    password_time_cost: int = Field(default=2, ge=1)
    password_memory_kib: int = Field(default=19456, ge=7168)
    password_parallelism: int = Field(default=1, ge=1)
    password_hash_threads: int = Field(default=1, ge=1, le=64)
    password_hash_nice: int = Field(default=10, ge=0, le=19)
    password_queue_limit: int = Field(default=64, ge=1)

    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    request_body_timeout: float = Field(default=60.0, gt=0, le=3600)
    request_threads: int = Field(default=16, ge=1, le=256)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    expose_worker_id: bool = False

    @property
    def is_development(self) -> bool:
        """Whether embedded defaults and generated secrets are allowed."""
        return self.service_env is Environment.DEVELOPMENT

    @property
    def database_request_slots(self) -> int:
        """How many requests may wait on the database at once (DATABASE_MAX_REQUESTS)."""
        if self.database_max_requests is not None:
            return self.database_max_requests
        return max(1, self.request_threads - 4)

    @property
    def embedded_database(self) -> bool:
        """Whether the service falls back to the development SQLite file."""
        return self.database_url is None

    @property
    def embedded_blocklist(self) -> bool:
        """Whether revocations live in process memory (development, one worker only)."""
        return self.redis_url is None

    @model_validator(mode="after")
    def _require_production_settings(self) -> Settings:
        if self.is_development:
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
        if missing:
            raise ValueError(
                "production mode requires "
                + ", ".join(missing)
                + " (or set SERVICE_ENV=development for a local run)"
            )
        for name, value in (("SECRET_KEY", self.secret_key), ("JWT_SECRET", self.jwt_secret)):
            if value is not None:
                _check_secret_strength(name, value)
        return self


def _check_secret_strength(name: str, value: str) -> None:
    """Refuse placeholder or short secrets: HS256 needs at least 256 bits."""
    if value.strip().lower() in PLACEHOLDER_SECRETS or len(value.encode()) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{name} must be a random value of at least {MIN_SECRET_BYTES} bytes "
            "(for example: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (plus overrides), raising ConfigError when unsafe."""
    try:
        settings = Settings(**overrides)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if settings.is_development:
        settings = _fill_development_secrets(settings)
    return settings


def _fill_development_secrets(settings: Settings) -> Settings:
    """Give development a stable generated secret, kept in the instance folder."""
    updates: dict[str, Any] = {}
    if not settings.secret_key:
        updates["secret_key"] = _instance_secret(settings.instance_dir / "dev-secret-key")
    if settings.jwt_algorithm == "HS256" and not settings.jwt_secret:
        updates["jwt_secret"] = _instance_secret(settings.instance_dir / "dev-jwt-secret")
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

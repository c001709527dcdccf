"""Settings: production refuses to start without real secrets; development fills them in."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import ConfigError, Settings, load_settings
from tests.servers import ROOT

STRONG = "x9" * 24
BASE = {
    "database_url": "postgresql://db/x",
    "redis_url": "redis://r",
    "secret_key": STRONG,
    "jwt_issuer": "https://auth.example",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment: start every test from an empty one."""
    for name in list(os.environ):
        if name.startswith(
            ("DATABASE_", "REDIS_", "JWT_", "SECRET_", "SERVICE_", "TLS_", "METRICS_", "LOG_")
        ) or name in ("ACCESS_LOG",):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"database_url": None}, "DATABASE_URL"),
        ({"redis_url": None}, "REDIS_URL"),
        ({"secret_key": None}, "SECRET_KEY"),
        ({}, "JWT_SECRET"),
        ({"jwt_secret": "changeme"}, "JWT_SECRET must be"),
        ({"jwt_secret": "short-secret"}, "JWT_SECRET must be"),
        ({"jwt_secret": STRONG, "secret_key": "secret"}, "SECRET_KEY must be"),
        ({"jwt_secret": STRONG, "secret_key_fallbacks": f"{STRONG},old"}, "FALLBACKS must be"),
        ({"jwt_secret": STRONG, "jwt_algorithm": "ES256"}, "JWT_PRIVATE_KEY_FILE"),
        ({"jwt_secret": STRONG, "jwt_secret_fallbacks": f"{STRONG},old"}, "FALLBACKS must be"),
        ({"jwt_algorithm": "ES256", "jwt_secret_fallbacks": STRONG}, "HS256 only"),
        ({"jwt_secret": STRONG, "jwt_public_key_fallback_files": "/x.pem"}, "RS256 and ES256"),
    ],
)
def test_production_refuses_unsafe_settings(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(**{**BASE, **overrides})


def test_production_accepts_complete_settings() -> None:
    settings = load_settings(**BASE, jwt_secret=STRONG)
    assert not settings.is_development
    assert settings.secret_keys == [STRONG]


def test_secret_key_fallbacks_follow_the_secret_key() -> None:
    older, oldest = "y8" * 24, "z7" * 24
    settings = load_settings(**BASE, jwt_secret=STRONG, secret_key_fallbacks=f"{older}, {oldest}")
    assert settings.secret_keys == [STRONG, older, oldest]


def test_jwt_secret_fallbacks_follow_the_jwt_secret() -> None:
    older = "y8" * 24
    settings = load_settings(**BASE, jwt_secret=STRONG, jwt_secret_fallbacks=f" {older} ,")
    assert settings.jwt_secrets == [STRONG, older]


def test_development_generates_stable_secrets(tmp_path: Path) -> None:
    first = load_settings(service_env="development", instance_dir=tmp_path)
    second = load_settings(service_env="development", instance_dir=tmp_path)
    assert first.jwt_secret and len(first.jwt_secret) >= 32
    assert first.jwt_secret == second.jwt_secret
    assert first.embedded_database and first.embedded_blocklist
    assert (tmp_path / "dev-jwt-secret").stat().st_mode & 0o077 == 0


def test_serve_refuses_to_start_in_production_without_config(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_", "REDIS_", "JWT_", "SECRET_", "SERVICE_"))
    }
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert (
        "production mode requires DATABASE_URL, REDIS_URL, SECRET_KEY, JWT_SECRET" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_the_revocation_check_cannot_be_switched_off_in_production() -> None:
    with pytest.raises(ConfigError, match="REVOCATION_CHECK"):
        load_settings(**BASE, jwt_secret=STRONG, revocation_check=False)


def test_public_metrics_need_a_strong_token_in_production() -> None:
    with pytest.raises(ConfigError, match=r"requires METRICS_TOKEN \(for METRICS_PUBLIC\)"):
        load_settings(**BASE, jwt_secret=STRONG, metrics_public=True)
    with pytest.raises(ConfigError, match="METRICS_TOKEN must be"):
        load_settings(**BASE, jwt_secret=STRONG, metrics_public=True, metrics_token="changeme")
    settings = load_settings(**BASE, jwt_secret=STRONG, metrics_public=True, metrics_token=STRONG)
    assert settings.metrics_public and settings.metrics_token == STRONG


def test_development_makes_a_metrics_token_when_metrics_are_public(tmp_path: Path) -> None:
    assert load_settings(service_env="development", instance_dir=tmp_path).metrics_token is None
    first = load_settings(service_env="development", instance_dir=tmp_path, metrics_public=True)
    again = load_settings(service_env="development", instance_dir=tmp_path, metrics_public=True)
    assert first.metrics_token and len(first.metrics_token) >= 32
    assert first.metrics_token == again.metrics_token
    assert (tmp_path / "dev-metrics-token").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    "bind", ["9464", ":9464", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "[::1]", "h:p"]
)
def test_a_metrics_bind_is_a_host_and_a_port(bind: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(**BASE, jwt_secret=STRONG, metrics_bind=bind)
    assert str(refused.value) == "METRICS_BIND must be host:port, such as 127.0.0.1:9464"


def test_logs_and_metrics_follow_the_environment_unless_told(tmp_path: Path) -> None:
    production = load_settings(**BASE, jwt_secret=STRONG)
    assert production.json_logs and production.logs_requests
    assert production.metrics_address is None and not production.metrics_public
    development = load_settings(
        service_env="development", instance_dir=tmp_path, metrics_bind="[::1]:9464"
    )
    assert not development.json_logs and not development.logs_requests
    assert development.metrics_address == ("::1", 9464)
    told = load_settings(**BASE, jwt_secret=STRONG, log_format="text", access_log=False)
    assert not told.json_logs and not told.logs_requests
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        load_settings(**BASE, jwt_secret=STRONG, log_level="LOUD")


def test_every_setting_is_in_the_readme_reference() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    reference = readme[readme.index("## Configuration reference") :]
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", reference, re.MULTILINE))
    assert documented == {name.upper() for name in Settings.model_fields}

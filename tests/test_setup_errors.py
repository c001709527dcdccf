"""Set-up mistakes end in one line naming the problem, from any directory, never a traceback."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service.__main__ import development_issuer
from service.config import DEV_ISSUER, ConfigError, Settings, load_settings
from service.tls import ensure_dev_certificate
from tests.servers import ROOT, free_port

# Root reads any file: the unreadable-file case drops the capabilities that allow it.
DROP_FILE_CAPABILITIES = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@dataclass
class Case:
    """One command line, its environment changes, and the one line it must end with."""

    args: list[str]
    status: int
    says: list[str]
    env: Callable[[Path, Settings], dict[str, str]] = field(default=lambda tmp, s: {})
    unreadable: str | None = None  # a file (from env) the command must not be able to read


def database(settings: Settings, **parts: str) -> str:
    """The test database's URL with some parts replaced."""
    url = urlsplit(str(settings.database_url))
    netloc = parts.get("netloc", url.netloc)
    return urlunsplit(url._replace(netloc=netloc, path=parts.get("path", url.path)))


def tls_files(tmp: Path, _settings: Settings) -> dict[str, str]:
    """A valid certificate and key pair."""
    cert, key = ensure_dev_certificate(tmp / "tls")
    return {"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}


def another_key(tmp: Path) -> str:
    """A P-256 key that belongs to no certificate."""
    path = tmp / "other-key.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path)


CASES = {
    "migrate, unknown database host": Case(
        ["migrate"],
        1,
        ["no-such-host.invalid"],
        lambda tmp, s: {"DATABASE_URL": database(s, netloc="postgres@no-such-host.invalid")},
    ),
    "migrate, nothing listens on the port": Case(
        ["migrate"],
        1,
        ["connection refused", "127.0.0.1:"],
        lambda tmp, s: {"DATABASE_URL": database(s, netloc=f"postgres@127.0.0.1:{free_port()}")},
    ),
    "migrate, no such database": Case(
        ["migrate"],
        1,
        ["authsvc_missing_", "does not exist"],
        lambda tmp, s: {"DATABASE_URL": database(s, path=f"/authsvc_missing_{uuid.uuid4().hex}")},
    ),
    "migrate, port is not a number": Case(
        ["migrate"],
        2,
        ["DATABASE_URL"],
        lambda tmp, s: {"DATABASE_URL": "postgresql://postgres@127.0.0.1:fivefourthree/x"},
    ),
    "migrate, not a URL": Case(
        ["migrate"], 2, ["DATABASE_URL"], lambda tmp, s: {"DATABASE_URL": "just words"}
    ),
    "keys list, nothing listens on the port": Case(
        ["keys", "list"],
        1,
        ["connection refused"],
        lambda tmp, s: {"DATABASE_URL": database(s, netloc=f"postgres@127.0.0.1:{free_port()}")},
    ),
    "REDIS_URL without a scheme": Case(
        ["migrate"], 2, ["REDIS_URL"], lambda tmp, s: {"REDIS_URL": "127.0.0.1:6379"}
    ),
    "REDIS_URL with a port that is not a number": Case(
        ["migrate"], 2, ["REDIS_URL"], lambda tmp, s: {"REDIS_URL": "redis://127.0.0.1:x/0"}
    ),
    "REDIS_URL naming a database by name": Case(
        ["migrate"], 2, ["REDIS_URL", "number"], lambda tmp, s: {"REDIS_URL": "redis://h/cache"}
    ),
    "JWT_ISSUER missing": Case(["migrate"], 2, ["JWT_ISSUER"], lambda tmp, s: {"JWT_ISSUER": ""}),
    "JWT_ISSUER not an https URL": Case(
        ["migrate"], 2, ["JWT_ISSUER", "https"], lambda tmp, s: {"JWT_ISSUER": "authsvc"}
    ),
    "a setting that is not a number": Case(
        ["migrate"], 2, ["DATABASE_POOL_SIZE"], lambda tmp, s: {"DATABASE_POOL_SIZE": "ten"}
    ),
    "JWT key file missing": Case(
        ["migrate"],
        2,
        ["JWT_PRIVATE_KEY_FILE", "No such file"],
        lambda tmp, s: {
            "JWT_ALGORITHM": "ES256",
            "JWT_PRIVATE_KEY_FILE": str(tmp / "absent.pem"),
        },
    ),
    "certificate file missing": Case(
        ["serve"],
        2,
        ["TLS_CERT_FILE", "absent-cert.pem", "No such file"],
        lambda tmp, s: tls_files(tmp, s) | {"TLS_CERT_FILE": str(tmp / "absent-cert.pem")},
    ),
    "certificate path is a directory": Case(
        ["serve"],
        2,
        ["TLS_CERT_FILE", "Is a directory"],
        lambda tmp, s: tls_files(tmp, s) | {"TLS_CERT_FILE": str(tmp)},
    ),
    "key file unreadable": Case(
        ["serve"],
        2,
        ["TLS_KEY_FILE", "dev-key.pem", "Permission denied"],
        tls_files,
        unreadable="TLS_KEY_FILE",
    ),
    "key of another certificate": Case(
        ["serve"],
        2,
        ["TLS_CERT_FILE", "TLS_KEY_FILE", "do not go together"],
        lambda tmp, s: tls_files(tmp, s) | {"TLS_KEY_FILE": another_key(tmp)},
    ),
    "hypercorn config file missing": Case(
        ["serve", "--config", "hypercorn.toml"],
        2,
        ["--config", "hypercorn.toml", "No such file"],
        tls_files,
    ),
}


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, *, unreadable: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m service ARGS` from cwd, as an operator would type it."""
    prefix: list[str] = []
    if unreadable is not None:
        unreadable.chmod(0)
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.fail("setpriv (util-linux) is needed to test unreadable files as root")
            prefix = DROP_FILE_CAPABILITIES
    return subprocess.run(
        [*prefix, sys.executable, "-m", "service", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def production_env(settings: Settings, tmp: Path) -> dict[str, str]:
    """A complete production environment on the test backends (nothing inherited)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "SERVICE_ENV": "production",
        "DATABASE_URL": str(settings.database_url),
        "REDIS_URL": str(settings.redis_url),
        "REDIS_PREFIX": settings.redis_prefix,
        "SECRET_KEY": secrets.token_urlsafe(48),
        "JWT_SECRET": secrets.token_urlsafe(48),
        "JWT_ISSUER": settings.jwt_issuer,
        "INSTANCE_DIR": str(tmp / "instance"),
    }


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_set_up_mistakes_end_in_one_line(settings: Settings, tmp_path: Path, case: Case) -> None:
    env = production_env(settings, tmp_path) | case.env(tmp_path, settings)
    unreadable = Path(env[case.unreadable]) if case.unreadable else None
    result = run_cli(case.args, env, tmp_path, unreadable=unreadable)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for fragment in case.says:
        assert fragment in lines[0], result.stderr
    assert result.returncode == case.status, result.stderr
    assert "Traceback" not in result.stdout


def test_secrets_never_reach_the_one_line(settings: Settings, tmp_path: Path) -> None:
    password, weak = secrets.token_urlsafe(16), f"weak-{secrets.token_hex(4)}"
    env = production_env(settings, tmp_path) | {
        "DATABASE_URL": f"postgresql://postgres:{password}@127.0.0.1:{free_port()}/x",
        "SECRET_KEY": weak,
    }
    result = run_cli(["migrate"], env, tmp_path)
    assert result.returncode == 2
    assert "SECRET_KEY must be" in result.stderr
    assert weak not in result.stderr
    refused = run_cli(["migrate"], env | {"SECRET_KEY": secrets.token_urlsafe(48)}, tmp_path)
    assert refused.returncode == 1, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert password not in refused.stderr


# --- The issuer setting (RFC 8414 section 2) ----------------------------------------------

STRONG = "x9" * 24
PRODUCTION = {
    "service_env": "production",
    "database_url": "postgresql://db/x",
    "redis_url": "redis://r",
    "secret_key": STRONG,
    "jwt_secret": STRONG,
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment: start from one without the service's variables."""
    for name in list(os.environ):
        if name.startswith(("DATABASE_", "REDIS_", "JWT_", "SECRET_", "SERVICE_", "INSTANCE_")):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    "issuer",
    [
        "authsvc",
        "http://auth.example",
        "https://",
        "https://auth.example/?tenant=a",
        "https://auth.example?",
        "https://auth.example/#top",
        "https://user@auth.example",
        "https://auth.example:notaport",
        "https://auth example",
    ],
)
def test_production_refuses_an_issuer_that_is_not_an_https_url(issuer: str) -> None:
    with pytest.raises(ConfigError, match="JWT_ISSUER") as refused:
        load_settings(**PRODUCTION, jwt_issuer=issuer)
    assert "\n" not in str(refused.value)


@pytest.mark.usefixtures("clean_env")
def test_production_requires_an_issuer_and_keeps_it_as_given() -> None:
    with pytest.raises(ConfigError, match="requires JWT_ISSUER"):
        load_settings(**PRODUCTION)
    for issuer in ("https://auth.example", "https://auth.example:8443/tenant-a"):
        assert load_settings(**PRODUCTION, jwt_issuer=issuer).jwt_issuer == issuer


@pytest.mark.usefixtures("clean_env")
def test_development_has_a_working_issuer(tmp_path: Path) -> None:
    settings = load_settings(service_env="development", instance_dir=tmp_path)
    assert settings.jwt_issuer == DEV_ISSUER == "https://127.0.0.1:8443"


@pytest.mark.parametrize(
    ("binds", "issuer"),
    [
        (["127.0.0.1:9443"], "https://127.0.0.1:9443"),
        (["0.0.0.0:8443"], "https://127.0.0.1:8443"),
        (["[::1]:8443"], "https://[::1]:8443"),
        (["localhost:7000", "127.0.0.1:7001"], "https://localhost:7000"),
        (["unix:/run/authsvc.sock"], DEV_ISSUER),
        ([], DEV_ISSUER),
    ],
)
def test_development_issuer_follows_the_bind(binds: list[str], issuer: str) -> None:
    assert development_issuer(binds) == issuer


@pytest.mark.usefixtures("clean_env")
def test_commands_work_from_another_directory(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for args in (["migrate"], ["keys", "list"], ["clients", "list"]):
        result = run_cli(args, production_env(settings, tmp_path), tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    # Development's files are the checkout's, not a folder of whatever directory it runs in.
    monkeypatch.chdir(tmp_path)
    assert Settings(service_env="development").instance_dir.resolve() == ROOT / "instance"

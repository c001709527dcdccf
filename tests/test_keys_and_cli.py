"""Asymmetric first-party keys from files, and the account command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from service.config import Settings
from tests.conftest import login, serve_in_process, settings_beside, write_key
from tests.servers import ROOT


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_asymmetric_first_party_tokens(
    settings: Settings, tmp_path: Path, algorithm: str
) -> None:
    own = settings_beside(
        settings,
        tmp_path,
        jwt_algorithm=algorithm,
        jwt_secret=None,
        jwt_private_key_file=write_key(tmp_path, algorithm),
    )
    async with serve_in_process(own) as http:
        username = f"asym_{algorithm.lower()}_{os.getpid()}"
        password = "correct horse battery"
        response = await http.post(
            "/auth/register", json={"username": username, "password": password}
        )
        assert response.status_code in {201, 409}
        session = await login(http, username, password)
        assert jwt.get_unverified_header(session.access)["alg"] == algorithm
        assert (await http.get("/api/hello", headers=session.bearer())).status_code == 200
        # The public key used as an HMAC secret must not verify anything.
        public_pem = Path(own.jwt_private_key_file or "").read_bytes()
        claims = jwt.decode(session.access, options={"verify_signature": False})
        forged = jwt.encode(claims, public_pem[:64].hex(), algorithm="HS256")
        assert (await http.get("/api/hello", headers=session.bearer(forged))).status_code == 401
        assert (await http.post("/auth/logout", headers=session.bearer())).status_code == 204
        assert (await http.get("/api/hello", headers=session.bearer())).status_code == 401


def create_user(
    settings: Settings, username: str, password: str
) -> subprocess.CompletedProcess[str]:
    """Run `python -m service create-user USERNAME --password-stdin` on the test database."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SERVICE_ENV": "production",
        "DATABASE_URL": str(settings.database_url),
        "REDIS_URL": str(settings.redis_url),
        "SECRET_KEY": str(settings.secret_key),
        "JWT_ISSUER": settings.jwt_issuer,
        "JWT_SECRET": str(settings.jwt_secret),
        "PASSWORD_MEMORY_KIB": "7168",
    }
    return subprocess.run(
        [sys.executable, "-m", "service", "create-user", username, "--password-stdin"],
        input=f"{password}\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_create_user_command(settings: Settings) -> None:
    username = f"cli_{os.getpid()}"
    created = create_user(settings, username, "a fine password")
    assert created.returncode == 0, created.stderr
    assert f"created {username}" in created.stdout
    again = create_user(settings, username, "a fine password")
    assert again.returncode == 1
    assert "is taken" in again.stderr
    short = create_user(settings, "cli_short_pw", "short")
    assert short.returncode == 1
    assert "Traceback" not in short.stderr

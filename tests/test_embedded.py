"""A newcomer's first run: no Postgres or Redis configured, the embedded defaults serve."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.servers import start_server

BACKEND_VARIABLES = ("DATABASE_", "REDIS_", "JWT_", "SECRET_", "SERVICE_ENV", "TLS_")


def test_development_server_serves_a_login(tmp_path: Path) -> None:
    env = {"INSTANCE_DIR": str(tmp_path / "instance"), "PASSWORD_MEMORY_KIB": "7168"}
    server = start_server(
        env, workers=2, log_dir=tmp_path, dev=True, cwd=tmp_path, unset=BACKEND_VARIABLES
    )
    try:
        with httpx.Client(base_url=server.url, verify=False, http2=True) as http:
            body = {"username": "newcomer", "password": "first steps"}
            assert http.post("/auth/register", json=body).status_code == 201
            login = http.post("/auth/login", json=body)
            assert login.status_code == 200
            bearer = {"Authorization": f"Bearer {login.json()['access_token']}"}
            assert http.get("/api/hello", headers=bearer).json() == {"message": "Hello, newcomer!"}
            assert http.post("/auth/logout", headers=bearer).status_code == 204
            assert http.get("/api/hello", headers=bearer).status_code == 401
    finally:
        assert server.stop() == 0
    log = server.log()
    assert "embedded SQLite" in log
    assert "ONE worker" in log
    assert (tmp_path / "instance" / "dev.sqlite3").exists()

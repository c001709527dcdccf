"""The OAuth endpoints under concurrent load on the real server: two workers, HTTP/2, TLS."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from tests.oauth_helpers import new_client
from tests.servers import RunningServer, server_env, start_server


@pytest.fixture
def server(settings: Settings, tmp_path: Path) -> Iterator[RunningServer]:
    """`python -m service serve --workers 2` on the test databases."""
    env = server_env(settings, tmp_path)
    running = start_server(env, workers=2, log_dir=tmp_path)
    try:
        yield running
    finally:
        running.stop()


async def test_token_endpoint_and_protected_path_under_concurrency(
    server: RunningServer, settings: Settings
) -> None:
    registered = await new_client(
        settings, grant_types=["client_credentials"], redirect_uris=[], scope="profile"
    )
    auth = (registered.client.client_id, registered.secret or "")
    async with httpx.AsyncClient(base_url=server.url, verify=False, http2=True) as http:

        async def one() -> tuple[int, int, int]:
            issued = await http.post(
                "/oauth/token", data={"grant_type": "client_credentials"}, auth=auth
            )
            token = issued.json().get("access_token", "")
            used = await http.get("/api/profile", headers={"Authorization": f"Bearer {token}"})
            revoked = await http.post("/oauth/revoke", data={"token": token}, auth=auth)
            return issued.status_code, used.status_code, revoked.status_code

        results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(60))), 60)
        assert set(results) == {(200, 200, 200)}, server.log()[-2000:]
        jwks = await http.get("/.well-known/jwks.json")
    assert jwks.status_code == 200

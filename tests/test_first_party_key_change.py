"""Changing the first-party signing key: tokens name their key, and earlier ones still verify."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from service import metrics
from service.auth.signing import public_kid, secret_kid
from service.config import Settings
from tests.conftest import Session, login, register, serve_in_process, settings_beside, write_key
from tests.oauth_helpers import bearer, claims_of, header_of


async def _hello(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.get("/api/hello", headers=bearer(token))


async def _signed_in(http: httpx.AsyncClient) -> Session:
    password = "correct horse battery"
    return await login(http, await register(http, password), password)


async def _under_earlier_keys(http: httpx.AsyncClient, metrics_token: str) -> float:
    """authsvc_tokens_under_earlier_key_total as the app's /metrics shows it now."""
    metrics.TALLY.flush()
    page = await http.get("/metrics", headers=bearer(metrics_token))
    assert page.status_code == 200, page.text
    found = re.search(r"^authsvc_tokens_under_earlier_key_total (\S+)$", page.text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _without_kid(token: str, secret: str) -> str:
    """The same token as a release without kids issued it: no kid, signed with secret."""
    return jwt.encode(claims_of(token), secret, algorithm="HS256")


async def test_sessions_outlive_a_jwt_secret_change_through_its_fallback(
    settings: Settings, tmp_path: Path
) -> None:
    old, new = secrets.token_urlsafe(48), secrets.token_urlsafe(48)
    before = settings_beside(settings, tmp_path, jwt_secret=old)
    watch = secrets.token_urlsafe(48)
    during = settings_beside(
        settings,
        tmp_path,
        jwt_secret=new,
        jwt_secret_fallbacks=old,
        metrics_public=True,
        metrics_token=watch,
    )
    after = settings_beside(settings, tmp_path, jwt_secret=new)
    async with serve_in_process(before) as http:
        kept, dropped = await _signed_in(http), await _signed_in(http)
        legacy = _without_kid(kept.access, old)
        assert (await _hello(http, legacy)).status_code == 200  # upgrading keeps them
    assert header_of(kept.access)["kid"] == secret_kid(old)

    async with serve_in_process(during) as http:
        counted = await _under_earlier_keys(http, watch)
        for token in (kept.access, legacy):
            assert (await _hello(http, token)).status_code == 200
        refreshed = await http.post("/auth/refresh", headers=bearer(kept.refresh))
        assert refreshed.status_code == 200, refreshed.text
        renewed = refreshed.json()
        assert header_of(renewed["access_token"])["kid"] == secret_kid(new)
        assert header_of(renewed["refresh_token"])["kid"] == secret_kid(new)
        assert (await _hello(http, renewed["access_token"])).status_code == 200
        # The two GETs and the refresh came with old-secret tokens; the last GET did not.
        assert await _under_earlier_keys(http, watch) == counted + 3

    async with serve_in_process(after) as http:
        assert (await _hello(http, renewed["access_token"])).status_code == 200
        for token, why in ((dropped.access, "unknown signing key"), (legacy, "Signature")):
            refused = await _hello(http, token)
            assert refused.status_code == 401
            assert why in refused.json()["detail"]
            assert 'error="invalid_token"' in refused.headers["www-authenticate"]
        expired_key = await http.post("/auth/refresh", headers=bearer(dropped.refresh))
        assert expired_key.status_code == 401


def test_each_secret_has_one_kid_of_its_own() -> None:
    secret = secrets.token_urlsafe(48)
    kid = secret_kid(secret)
    assert kid == secret_kid(secret) != secret_kid(secrets.token_urlsafe(48))
    assert kid.startswith("fp-") and len(kid) == 19  # never a 43-character JWK thumbprint


def _public_half(private_pem: Path) -> Path:
    """The public key of a PEM private key file, written beside it."""
    key = serialization.load_pem_private_key(private_pem.read_bytes(), password=None)
    path = private_pem.with_suffix(".pub.pem")
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_sessions_outlive_a_signing_key_change_through_its_public_half(
    settings: Settings, tmp_path: Path, algorithm: str
) -> None:
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir(), new_dir.mkdir()
    old, new = write_key(old_dir, algorithm), write_key(new_dir, algorithm)
    asymmetric = {"jwt_algorithm": algorithm, "jwt_secret": None}
    before = settings_beside(settings, tmp_path, **asymmetric, jwt_private_key_file=old)
    during = settings_beside(
        settings,
        tmp_path,
        **asymmetric,
        jwt_private_key_file=new,
        jwt_public_key_fallback_files=str(_public_half(old)),
    )
    after = settings_beside(settings, tmp_path, **asymmetric, jwt_private_key_file=new)
    async with serve_in_process(before) as http:
        kept, dropped = await _signed_in(http), await _signed_in(http)
    assert header_of(kept.access)["kid"] == public_kid(_public_half(old).read_text())

    async with serve_in_process(during) as http:
        assert (await _hello(http, kept.access)).status_code == 200
        refreshed = await http.post("/auth/refresh", headers=bearer(kept.refresh))
        assert refreshed.status_code == 200, refreshed.text
        renewed = refreshed.json()["access_token"]
        assert header_of(renewed)["kid"] == public_kid(_public_half(new).read_text())

    async with serve_in_process(after) as http:
        assert (await _hello(http, renewed)).status_code == 200
        refused = await _hello(http, dropped.access)
        assert refused.status_code == 401
        assert "unknown signing key" in refused.json()["detail"]

"""Metadata, JWKS, key rotation, algorithm confusion, and the clients/keys commands."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from itsdangerous import BadSignature
from sqlalchemy import update

from service import create_app
from service.config import Settings
from service.ids import new_id
from service.oauth import clients, keys
from service.store import oauth_keys as key_store
from service.store.db import Database
from service.store.migrate import upgrade
from service.store.models import utcnow
from service.store.oauth_models import SigningKey
from tests.conftest import (
    Session,
    fresh_database,
    login,
    register,
    serve_in_process,
    settings_beside,
    wait_for_status,
)
from tests.oauth_helpers import REDIRECT, authorization_code, bearer, header_of, new_client

ROOT = Path(__file__).resolve().parent.parent
CLIENT_CREDENTIALS = {"grant_type": "client_credentials"}


async def machine_token(http: httpx.AsyncClient, settings: Settings) -> str:
    """An access token from the client credentials grant."""
    registered = await new_client(
        settings, grant_types=["client_credentials"], redirect_uris=[], scope="profile"
    )
    response = await http.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=(registered.client.client_id, registered.secret or ""),
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


async def jwks_of(http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """The published keys by kid."""
    response = await http.get("/.well-known/jwks.json")
    assert response.status_code == 200
    return {key["kid"]: key for key in response.json()["keys"]}


def verify(token: str, jwks: dict[str, dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """Verify a token as a resource server would: by kid, from the JWKS, with PyJWT."""
    header = header_of(token)
    key = jwt.PyJWK(jwks[header["kid"]])
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=[key.algorithm_name],
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
    )
    return claims


async def test_metadata_describes_what_is_served(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    response = await client.get("/.well-known/oauth-authorization-server")
    assert response.status_code == 200
    meta = response.json()
    assert meta["issuer"] == settings.jwt_issuer
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["response_types_supported"] == ["code"]
    assert "password" not in meta["grant_types_supported"]
    assert "implicit" not in meta["grant_types_supported"]
    for name in ("token_endpoint", "revocation_endpoint", "introspection_endpoint"):
        path = httpx.URL(meta[name]).path
        answer = await client.post(path, data={})
        assert answer.status_code in {400, 401}, name
        assert "error" in answer.json()
    jwks = await client.get(httpx.URL(meta["jwks_uri"]).path)
    assert jwks.status_code == 200
    authorize = await client.get(httpx.URL(meta["authorization_endpoint"]).path)
    assert authorize.status_code in {400, 401}


async def test_issued_tokens_verify_with_the_published_key(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    token = await machine_token(client, settings)
    jwks = await jwks_of(client)
    key = jwks[header_of(token)["kid"]]
    assert key["kty"] == "EC" and key["alg"] == "ES256" and key["use"] == "sig"
    assert "d" not in key
    claims = verify(token, jwks, settings)
    meta = (await client.get("/.well-known/oauth-authorization-server")).json()
    assert claims["iss"] == meta["issuer"]


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m service ...` against the test database."""
    env = {
        "SERVICE_ENV": "production",
        "DATABASE_URL": str(settings.database_url),
        "REDIS_URL": str(settings.redis_url),
        "REDIS_PREFIX": settings.redis_prefix,
        "SECRET_KEY": str(settings.secret_key),
        "SECRET_KEY_FALLBACKS": settings.secret_key_fallbacks,
        "JWT_ISSUER": settings.jwt_issuer,
        "JWT_SECRET": str(settings.jwt_secret),
        "INSTANCE_DIR": str(settings.instance_dir),
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_key_rotation_keeps_old_tokens_valid(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    old_token = await machine_token(client, settings)
    old_kid = header_of(old_token)["kid"]
    rotated = run_cli(settings, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    async with serve_in_process(settings) as fresh:
        new_token = await machine_token(fresh, settings)
        new_kid = header_of(new_token)["kid"]
        assert new_kid != old_kid
        assert new_kid in rotated.stdout
        # A worker that has not reread the keys yet learns the new one in the background.
        await wait_for_status(client, bearer(new_token), 200)
        for http in (client, fresh):
            for token in (old_token, new_token):
                assert (await http.get("/api/hello", headers=bearer(token))).status_code == 200
        jwks = await jwks_of(fresh)
        assert {old_kid, new_kid} <= jwks.keys()
        verify(old_token, jwks, settings)
        verify(new_token, jwks, settings)

    retired = run_cli(settings, "keys", "retire", old_kid)
    assert retired.returncode == 0, retired.stderr
    listing = json.loads(run_cli(settings, "keys", "list").stdout)
    retired_at = datetime.fromisoformat(
        next(k for k in listing if k["kid"] == old_kid)["retired_at"]
    )
    # Due once every worker has reread the keys, so none signs with it past that moment.
    assert retired_at >= utcnow() + timedelta(seconds=keys.RELOAD_SECONDS)
    assert sum(k["retired_at"] is None for k in listing) == len(listing) - 1
    async with serve_in_process(settings) as fresh:
        # Retired, yet published until the tokens it signed have expired.
        assert old_kid in await jwks_of(fresh)
        assert (await fresh.get("/api/hello", headers=bearer(old_token))).status_code == 200


async def test_rotating_with_another_secret_key_is_refused_and_adds_nothing(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path
) -> None:
    await machine_token(client, settings)  # the shared database holds a key in use
    database = Database(settings)
    try:
        async with database.session() as session:
            before = {row.kid for row in await key_store.list_keys(session)}
        other = settings_beside(settings, tmp_path, secret_key=secrets.token_urlsafe(48))
        refused = run_cli(other, "keys", "rotate")
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.startswith("refused: SECRET_KEY differs"), refused.stderr
        assert str(other.secret_key) not in refused.stderr + refused.stdout
        async with database.session() as session:
            assert {row.kid for row in await key_store.list_keys(session)} == before
    finally:
        await database.dispose()


async def test_keys_retired_longer_than_a_token_lifetime_are_unpublished(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    database = Database(settings)
    try:
        async with database.session() as session:
            kid = await keys.create_key(session, secret_key=str(settings.secret_key))
        async with database.session() as session:
            lifetime = settings.access_token_ttl + keys.RELOAD_SECONDS
            long_ago = utcnow() - timedelta(seconds=lifetime + 5)
            await session.execute(
                update(SigningKey).where(SigningKey.kid == kid).values(retired_at=long_ago)
            )
    finally:
        await database.dispose()
    async with serve_in_process(settings) as fresh:
        assert kid not in await jwks_of(fresh)


async def test_a_worker_stops_signing_with_a_retired_key_and_its_tokens_stay_valid(
    settings: Settings,
) -> None:
    registered = await new_client(
        settings, grant_types=["client_credentials"], redirect_uris=[], scope="profile"
    )
    auth = (registered.client.client_id, registered.secret or "")

    async def issue(http: httpx.AsyncClient) -> str:
        response = await http.post(
            "/oauth/token", data={"grant_type": "client_credentials"}, auth=auth
        )
        token: str = response.json()["access_token"]
        return token

    database = Database(settings)
    async with serve_in_process(settings) as worker:
        old_kid = header_of(await issue(worker))["kid"]
        try:
            async with database.session() as session:
                new_kid = await keys.create_key(session, secret_key=str(settings.secret_key))
            async with database.session() as session:
                # The worst case: retired at once, while the worker's copy predates it.
                assert await key_store.retire_key(session, kid=old_kid)
        finally:
            await database.dispose()
        # Within a few seconds a stale copy may still sign with it...
        late = await issue(worker)
        await asyncio.sleep(keys.SIGNER_RELOAD_SECONDS)
        # ...but no longer: the signer rereads its copy before signing.
        assert header_of(await issue(worker))["kid"] == new_kid
    async with serve_in_process(settings) as other:
        # Whatever the stale copy signed stays valid for its whole lifetime elsewhere.
        assert old_kid in await jwks_of(other)
        assert (await other.get("/api/hello", headers=bearer(late))).status_code == 200


async def test_a_scheduled_retirement_hands_over_on_time_from_the_cached_copy(
    settings: Settings,
) -> None:
    registered = await new_client(
        settings, grant_types=["client_credentials"], redirect_uris=[], scope="profile"
    )
    auth = (registered.client.client_id, registered.secret or "")
    async with serve_in_process(settings) as worker:
        response = await worker.post(
            "/oauth/token", data={"grant_type": "client_credentials"}, auth=auth
        )
        old_kid = header_of(response.json()["access_token"])["kid"]
    handover = utcnow() + timedelta(seconds=2)
    database = Database(settings)
    try:
        async with database.session() as session:
            new_kid = await keys.create_key(
                session, secret_key=str(settings.secret_key), activates_at=handover
            )
            assert await key_store.retire_key(session, kid=old_kid, at=handover)
    finally:
        await database.dispose()
    async with serve_in_process(settings) as worker:
        assert new_kid in await jwks_of(worker)  # published before it signs

        async def signer() -> str:
            response = await worker.post(
                "/oauth/token", data={"grant_type": "client_credentials"}, auth=auth
            )
            kid: str = header_of(response.json()["access_token"])["kid"]
            return kid

        assert await signer() == old_kid
        await asyncio.sleep(max(0.0, (handover - utcnow()).total_seconds()) + 0.1)
        # Well within the reread interval: the cached copy alone says the old key is done.
        assert await signer() == new_kid


async def wait_for(condition: Callable[[], bool], seconds: float = 2.0) -> None:
    """Wait until condition holds, failing after seconds."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def junk_token(kid: str) -> str:
    """A token naming a key nobody has."""
    return forge({"alg": "ES256", "kid": kid}, {}, None) + "AAAA"


async def test_unknown_kid_is_refused_at_once_while_the_keys_reload_behind(
    settings: Settings, captured_app: list[Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_in_process(settings) as http:
        keyring = captured_app[0].extensions["oauth_keyring"]
        known = await machine_token(http, settings)
        release, calls = threading.Event(), []

        async def stuck_database() -> None:
            calls.append(time.monotonic())
            while not release.is_set():
                await asyncio.sleep(0.01)
            raise OSError("database unreachable")

        monkeypatch.setattr(keyring, "load", stuck_database)
        try:
            started = time.monotonic()
            refused, health = await asyncio.gather(
                http.get("/api/hello", headers=bearer(junk_token("nobody-1"))),
                http.get("/healthz"),
            )
            assert refused.status_code == 401
            assert health.status_code == 200
            assert time.monotonic() - started < 1.0
            await wait_for(lambda: bool(calls))  # the reload runs behind, on the app's loop
            again = await http.get("/api/hello", headers=bearer(junk_token("nobody-2")))
            assert again.status_code == 401
            assert time.monotonic() - started < 2.0
            assert len(calls) == 1  # one reload at a time, however many junk tokens
            assert (await http.get("/api/hello", headers=bearer(known))).status_code == 200
        finally:
            release.set()
            await asyncio.sleep(0.1)  # let the reload end before the app shuts down


async def test_failed_reloads_are_rate_limited(
    settings: Settings, captured_app: list[Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_in_process(settings) as http:
        keyring = captured_app[0].extensions["oauth_keyring"]
        calls: list[float] = []

        async def failing_database() -> None:
            calls.append(time.monotonic())
            raise OSError("database unreachable")

        monkeypatch.setattr(keyring, "load", failing_database)
        started = time.monotonic()
        for attempt in range(20):
            response = await http.get("/api/hello", headers=bearer(junk_token(f"junk-{attempt}")))
            assert response.status_code == 401
            await asyncio.sleep(0.02)
        assert time.monotonic() - started < keys.MISS_RELOAD_SECONDS
        assert len(calls) == 1  # the failed attempt counts: no retry before the interval
        await asyncio.sleep(keys.MISS_RELOAD_SECONDS)
        await http.get("/api/hello", headers=bearer(junk_token("junk-after")))
        await wait_for(lambda: len(calls) == 2)


async def test_signers_reread_the_keys_ahead_without_waiting(
    settings: Settings, captured_app: list[Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_in_process(settings) as http:
        keyring = captured_app[0].extensions["oauth_keyring"]
        await machine_token(http, settings)
        release, calls = threading.Event(), []

        async def slow_database() -> None:
            calls.append(time.monotonic())
            while not release.is_set():
                await asyncio.sleep(0.01)

        monkeypatch.setattr(keyring, "load", slow_database)
        # A copy about to need its reread: the token is signed from it at once...
        keyring._loaded_at = time.monotonic() - keys.SIGNER_RELOAD_SECONDS + 0.5
        try:
            started = time.monotonic()
            await machine_token(http, settings)
            assert time.monotonic() - started < 0.4
            # ...while the reread runs behind, on the app's loop.
            await wait_for(lambda: bool(calls))
        finally:
            release.set()
            await asyncio.sleep(0.1)  # let the reload end before the app shuts down


async def test_keys_sealed_with_another_secret_key_refuse_oauth_tokens_with_503(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    issued_elsewhere = await machine_token(client, settings)
    machine = await new_client(
        settings, grant_types=["client_credentials"], redirect_uris=[], scope="profile"
    )
    app = await new_client(settings, scope="profile")
    # The shared database's keys were sealed with settings.secret_key.
    other = settings_beside(settings, tmp_path, secret_key=secrets.token_urlsafe(48))
    caplog.set_level(logging.INFO)
    async with serve_in_process(other) as http:
        auth = (machine.client.client_id, machine.secret or "")
        refused = await http.post("/oauth/token", data=CLIENT_CREDENTIALS, auth=auth)
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert int(refused.headers["Retry-After"]) > 0
        assert refused.json()["status"] == 503 and refused.json()["detail"]
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {
            "database": "ok",
            "blocklist": "ok",
            "signing_keys": "unreadable",
        }
        # First-party tokens do not need those keys; OAuth tokens signed elsewhere still verify.
        password = "correct horse battery"
        username = await register(http, password)
        session = await login(http, username, password)
        assert (await http.get("/api/hello", headers=session.bearer())).status_code == 200
        assert (await http.get("/api/hello", headers=bearer(issued_elsewhere))).status_code == 200
        assert header_of(issued_elsewhere)["kid"] in await jwks_of(http)
        # A code is not spent by a refusal: a worker that can sign redeems it.
        code, verifier = await authorization_code(http, app.client.client_id, username, password)
        redeem = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        }
        auth = (app.client.client_id, app.secret or "")
        assert (await http.post("/oauth/token", data=redeem, auth=auth)).status_code == 503
    assert (await client.post("/oauth/token", data=redeem, auth=auth)).status_code == 200
    complaints = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(complaints) == 1, [r.getMessage() for r in complaints]
    assert complaints[0].levelno == logging.ERROR
    line = complaints[0].getMessage()
    assert "SECRET_KEY differs from the one that sealed the stored signing keys" in line
    for secret in (str(other.secret_key), str(settings.secret_key)):
        assert secret not in caplog.text


async def test_a_key_sealed_with_another_secret_key_signs_nothing_here_and_adds_none(
    settings: Settings, postgres_server: str, prefix: str, tmp_path: Path
) -> None:
    elsewhere, a_minute_ago = secrets.token_urlsafe(48), utcnow() - timedelta(minutes=1)
    with fresh_database(postgres_server) as url:
        own = settings_beside(settings, tmp_path, database_url=url, redis_prefix=prefix)
        await asyncio.to_thread(upgrade, own)
        registered = await new_client(
            own, grant_types=["client_credentials"], redirect_uris=[], scope="profile"
        )

        async def ask(http: httpx.AsyncClient) -> httpx.Response:
            auth = (registered.client.client_id, registered.secret or "")
            return await http.post("/oauth/token", data=CLIENT_CREDENTIALS, auth=auth)

        database = Database(own)
        try:
            async with database.session() as session:
                secret_key = str(own.secret_key)
                readable = await keys.create_key(
                    session, secret_key=secret_key, activates_at=a_minute_ago
                )
                await keys.create_key(session, secret_key=elsewhere)  # newer, and active
            async with serve_in_process(own) as http:
                # The newest key is skipped: the older one this process can unseal signs.
                assert header_of((await ask(http)).json()["access_token"])["kid"] == readable
                assert (await http.get("/readyz")).status_code == 200
            async with database.session() as session:
                await session.execute(update(SigningKey).values(retired_at=utcnow()))
            async with serve_in_process(own) as http:
                # No key signs on, yet none is added beside one its owner could not read.
                assert (await ask(http)).status_code == 503
                assert (await http.get("/readyz")).json()["checks"]["signing_keys"] == "unreadable"
            async with database.session() as session:
                assert len(await key_store.list_keys(session)) == 2
        finally:
            await database.dispose()


async def test_secret_key_changes_through_fallbacks_and_reseal_without_a_refusal(
    settings: Settings, postgres_server: str, prefix: str, tmp_path: Path
) -> None:
    old, new = secrets.token_urlsafe(48), secrets.token_urlsafe(48)
    with fresh_database(postgres_server) as url:
        before = settings_beside(
            settings, tmp_path, database_url=url, redis_prefix=prefix, secret_key=old
        )
        await asyncio.to_thread(upgrade, before)
        registered = await new_client(
            before, grant_types=["client_credentials"], redirect_uris=[], scope="profile"
        )

        async def signing_kid(http: httpx.AsyncClient) -> str:
            auth = (registered.client.client_id, registered.secret or "")
            answer = await http.post("/oauth/token", data=CLIENT_CREDENTIALS, auth=auth)
            assert answer.status_code == 200, answer.text
            return str(header_of(answer.json()["access_token"])["kid"])

        async with serve_in_process(before) as http:
            kid = await signing_kid(http)  # the first key, sealed with the old secret
        during = settings_beside(before, tmp_path, secret_key=new, secret_key_fallbacks=old)
        after = settings_beside(before, tmp_path, secret_key=new)
        async with serve_in_process(during) as http:
            assert await signing_kid(http) == kid
            assert (await http.get("/readyz")).status_code == 200
        stranger = settings_beside(before, tmp_path, secret_key=secrets.token_urlsafe(48))
        refused = run_cli(stranger, "keys", "reseal")
        assert refused.returncode == 1, refused.stdout
        assert kid in refused.stderr and "nothing changed" in refused.stderr
        resealed = run_cli(during, "keys", "reseal")
        assert resealed.returncode == 0, resealed.stderr
        assert resealed.stdout.startswith("resealed 1 key(s)"), resealed.stdout
        assert run_cli(during, "keys", "reseal").stdout.startswith("resealed 0 key(s)")
        async with serve_in_process(after) as http:
            assert await signing_kid(http) == kid  # the same key, now under the new secret
        async with serve_in_process(before) as http:
            auth = (registered.client.client_id, registered.secret or "")
            answer = await http.post("/oauth/token", data=CLIENT_CREDENTIALS, auth=auth)
            assert answer.status_code == 503  # the old secret alone opens nothing now


def test_a_browser_sign_in_under_the_previous_secret_key_stays_valid(
    settings: Settings, tmp_path: Path
) -> None:
    old, new = secrets.token_urlsafe(48), secrets.token_urlsafe(48)
    signed_before = create_app(settings_beside(settings, tmp_path, secret_key=old))
    cookie = signed_before.session_interface.get_signing_serializer(signed_before).dumps(
        {"user": "someone"}
    )
    during = create_app(
        settings_beside(settings, tmp_path, secret_key=new, secret_key_fallbacks=old)
    )
    after = create_app(settings_beside(settings, tmp_path, secret_key=new))
    opened = during.session_interface.get_signing_serializer(during).loads(cookie)
    assert opened == {"user": "someone"}
    with pytest.raises(BadSignature):
        after.session_interface.get_signing_serializer(after).loads(cookie)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token with an arbitrary header, HMAC-signed with secret (or unsigned)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if secret is None:
        return signing_input + "."
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def plausible_claims(settings: Settings) -> dict[str, Any]:
    """Claims that would pass every check but the signature."""
    now = int(time.time())
    return {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": "attacker",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": new_id(),
        "sid": new_id(),
        "type": "access",
        "name": "attacker",
        "scope": "profile email",
    }


async def test_algorithm_confusion_is_refused(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    token = await machine_token(client, settings)
    kid = header_of(token)["kid"]
    public_pem = jwt.PyJWK((await jwks_of(client))[kid]).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = plausible_claims(settings)
    stranger = ec.generate_private_key(ec.SECP256R1())
    first_party_kid = header_of(user.access)["kid"]
    attempts = {
        "HS256 keyed with the public key, with kid": forge(
            {"alg": "HS256", "typ": "JWT", "kid": kid}, claims, public_pem
        ),
        "HS256 keyed with the public key, no kid": forge(
            {"alg": "HS256", "typ": "JWT"}, claims, public_pem
        ),
        "alg none with kid": forge({"alg": "none", "kid": kid}, claims, None),
        "alg none": forge({"alg": "none"}, claims, None),
        "unknown kid": jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": "nope"}),
        "right kid, wrong key": jwt.encode(
            claims, stranger, algorithm="ES256", headers={"kid": kid}
        ),
        "ES256 without kid": jwt.encode(claims, stranger, algorithm="ES256"),
        "HS384 with the first-party secret": jwt.encode(
            claims, str(settings.jwt_secret), algorithm="HS384"
        ),
        "ES256 under the first-party kid": jwt.encode(
            claims, stranger, algorithm="ES256", headers={"kid": first_party_kid}
        ),
        "HS256 under the first-party kid, keyed with the public key": forge(
            {"alg": "HS256", "typ": "JWT", "kid": first_party_kid}, claims, public_pem
        ),
        "HS256 under an unknown first-party kid": jwt.encode(
            claims, str(settings.jwt_secret), algorithm="HS256", headers={"kid": "fp-0"}
        ),
    }
    for name, forged in attempts.items():
        response = await client.get("/api/hello", headers=bearer(forged))
        assert response.status_code == 401, name
        assert 'error="invalid_token"' in response.headers["www-authenticate"], name
    assert (await client.get("/api/hello", headers=bearer(user.access))).status_code == 200
    assert (await client.get("/api/hello", headers=bearer(token))).status_code == 200


async def test_clients_command(client: httpx.AsyncClient, settings: Settings) -> None:
    created = run_cli(
        settings,
        "clients",
        "create",
        "--name",
        "Reporting job",
        "--grant-type",
        "client_credentials",
        "--scope",
        "email",
    )
    assert created.returncode == 0, created.stderr
    record = json.loads(created.stdout)
    client_id, secret = record["client_id"], record["client_secret"]
    assert record["token_endpoint_auth_method"] == "client_secret_basic"

    async def token_status(secret: str) -> int:
        response = await client.post(
            "/oauth/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret)
        )
        return response.status_code

    assert await token_status(secret) == 200
    listed = json.loads(run_cli(settings, "clients", "list").stdout)
    assert client_id in {c["client_id"] for c in listed}
    assert all("client_secret" not in c for c in listed)
    shown = run_cli(settings, "clients", "show", client_id)
    assert json.loads(shown.stdout)["name"] == "Reporting job"
    assert secret not in shown.stdout

    rotated = json.loads(run_cli(settings, "clients", "rotate-secret", client_id).stdout)
    assert rotated["client_secret"] != secret
    assert await token_status(secret) == 401
    assert await token_status(rotated["client_secret"]) == 200

    assert json.loads(shown.stdout)["resource_server"] is False

    api = run_cli(
        settings,
        "clients",
        "create",
        "--name",
        "Orders API",
        "--grant-type",
        "client_credentials",
        "--resource-server",
    )
    assert api.returncode == 0, api.stderr
    api_record = json.loads(api.stdout)
    assert api_record["resource_server"] is True
    introspected = await client.post(
        "/oauth/introspect",
        data={"token": (await machine_token(client, settings))},
        auth=(api_record["client_id"], api_record["client_secret"]),
    )
    assert introspected.json()["active"] is True

    assert run_cli(settings, "clients", "delete", client_id).returncode == 0
    assert run_cli(settings, "clients", "show", client_id).returncode == 1
    assert await token_status(rotated["client_secret"]) == 401


def test_kids_never_read_as_command_line_options() -> None:
    jwks = [keys.new_signing_key()[1] for _ in range(2000)]  # 1 in 64 would start with -
    kids = [jwk["kid"] for jwk in jwks]
    assert kids == [keys.thumbprint(jwk) for jwk in jwks]
    assert not [kid for kid in kids if kid.startswith("-")]
    assert {len(kid) for kid in kids} == {43} and len(set(kids)) == len(kids)


def test_client_ids_never_read_as_command_line_options(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter(["-dashFirst", "-again", "kept_id"])
    monkeypatch.setattr(clients.secrets, "token_urlsafe", lambda _n: next(drawn))
    assert clients.new_client_id() == "kept_id"
    monkeypatch.undo()
    ids = [clients.new_client_id() for _ in range(2000)]  # 1 in 64 drew a dash before
    assert not [i for i in ids if i.startswith("-")]
    assert {len(i) for i in ids} == {22} and len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    "args",
    [
        ["--public", "--grant-type", "client_credentials"],
        ["--redirect-uri", "http://evil.example/cb"],
        ["--redirect-uri", "https://ok.example/cb#frag"],
        ["--scope", "admin"],
        [],  # authorization_code without a redirect URI
        ["--public", "--redirect-uri", "https://ok.example/cb", "--resource-server"],
    ],
)
def test_clients_command_refuses_unsafe_registrations(settings: Settings, args: list[str]) -> None:
    result = run_cli(settings, "clients", "create", "--name", "bad", *args)
    assert result.returncode != 0
    assert "invalid client" in result.stderr

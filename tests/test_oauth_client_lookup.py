"""OAuth clients are looked up by each request, on the event loop, suspended while it waits."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask, current_app

from service import close_app, create_app
from service.config import Settings
from service.loop import WorkerLoop, WouldBlock, run_suspendable, suspendable
from service.oauth import bridge, client_throttle, clients, keys
from service.oauth import server as oauth_server
from service.oauth.client_throttle import MAX_FORM_BYTES, named_clients
from service.oauth.clients import (
    Registered,
    delete_client,
    find_clients,
    plausible_identifier,
    rotate_secret,
)
from service.store import Store
from service.store.db import Database
from tests.conftest import serve_in_process, settings_beside
from tests.oauth_helpers import new_client

TOKEN = "/oauth/token"
FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Site:
    """Where a call ran: its thread, whether that is the app loop's, whether it may wait."""

    thread: threading.Thread
    loop_thread: bool
    suspendable: bool


def site() -> Site:
    """Where the caller runs, inside a request of the app."""
    loop: WorkerLoop = current_app.extensions["loop"]
    return Site(threading.current_thread(), loop.in_loop_thread(), suspendable())


def on_the_loop() -> Site:
    """Where a request runs when served by this test's loop: its thread, suspendable."""
    return Site(threading.current_thread(), loop_thread=True, suspendable=True)


@dataclass
class Lookups:
    """The client ids that requests looked up, and where each lookup was made."""

    ids: list[list[str]] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> Lookups:
    """Record every client lookup of query_client."""
    seen = Lookups()

    def recording(*, database: Database, client_ids: Sequence[str]) -> Any:
        seen.ids.append(list(client_ids))
        seen.sites.append(site())
        return find_clients(database=database, client_ids=client_ids)

    monkeypatch.setattr(oauth_server, "find_clients", recording)
    return seen


def record_sites(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[Site]:
    """Where each call of owner.name runs, from now on."""
    sites: list[Site] = []
    original: Callable[..., Any] = getattr(owner, name)

    def recording(*args: Any, **kwargs: Any) -> Any:
        sites.append(site())
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return sites


async def machine(settings: Settings, **options: Any) -> Registered:
    """A confidential client of the client credentials grant."""
    options.setdefault("scope", "profile")
    return await new_client(
        settings, grant_types=["client_credentials"], redirect_uris=[], **options
    )


async def ask_token(
    http: httpx.AsyncClient, registered: Registered, secret: str | None = None
) -> httpx.Response:
    """A client_credentials request authenticated as the client is registered to."""
    client, secret = registered.client, secret or registered.secret or ""
    form = {"grant_type": "client_credentials"}
    if client.auth_method == "client_secret_post":
        return await http.post(
            TOKEN, data={**form, "client_id": client.client_id, "client_secret": secret}
        )
    return await http.post(TOKEN, data=form, auth=(client.client_id, secret))


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_a_client_credentials_request_runs_on_the_event_loop(
    client: httpx.AsyncClient, settings: Settings, lookups: Lookups, auth_method: str
) -> None:
    registered = await machine(settings, auth_method=auth_method)
    response = await ask_token(client, registered)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert lookups.ids == [[registered.client.client_id]]
    # The view waited for PostgreSQL suspended on the loop's own thread: no thread hop.
    assert lookups.sites == [on_the_loop()]


async def test_revocation_and_introspection_authenticate_clients_too(
    client: httpx.AsyncClient, settings: Settings, lookups: Lookups
) -> None:
    registered = await machine(settings)
    auth = (registered.client.client_id, registered.secret or "")
    token = (await ask_token(client, registered)).json()["access_token"]
    seen = await client.post("/oauth/introspect", data={"token": token}, auth=auth)
    assert seen.json()["active"] is True
    assert (await client.post("/oauth/revoke", data={"token": token}, auth=auth)).status_code == 200
    seen = await client.post("/oauth/introspect", data={"token": token}, auth=auth)
    assert seen.json() == {"active": False}
    wrong = await client.post("/oauth/revoke", data={"token": token}, auth=(auth[0], "wrong"))
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
    # Each authenticated the client: looked up, or kept from a lookup made on the loop.
    assert lookups.ids and all(ids == [registered.client.client_id] for ids in lookups.ids)
    assert lookups.sites == [on_the_loop()] * len(lookups.ids)


async def until_kept(http: httpx.AsyncClient, registered: Registered, lookups: Lookups) -> None:
    """Ask for tokens until one is served without a lookup: the worker keeps the client.

    A worker keeps nothing until its feed has proved itself fresh (a few ms after its
    first lookup).
    """
    deadline = time.monotonic() + 5
    while True:
        before = len(lookups.ids)
        assert (await ask_token(http, registered)).status_code == 200
        if len(lookups.ids) == before:
            return
        assert time.monotonic() < deadline, "the client was never kept"
        await asyncio.sleep(0.02)


async def test_a_deleted_client_is_refused_from_the_next_request(
    client: httpx.AsyncClient, settings: Settings, lookups: Lookups
) -> None:
    registered = await machine(settings)
    await until_kept(client, registered, lookups)
    store = Store(settings, WorkerLoop())
    try:
        assert await delete_client(store=store, client_id=registered.client.client_id)
    finally:
        await store.close()
    looked_up = len(lookups.ids)
    refused = await ask_token(client, registered)
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"
    # The deletion was announced: the worker dropped what it kept and read the client again.
    assert lookups.ids[looked_up:] == [[registered.client.client_id]]


async def rotated(settings: Settings, registered: Registered) -> str:
    """Rotate the client's secret as the CLI does, with a store of settings; the new secret."""
    store = Store(settings, WorkerLoop())
    try:
        secret = await rotate_secret(store=store, client_id=registered.client.client_id)
    finally:
        await store.close()
    assert secret is not None
    return secret


async def test_a_rotated_secret_counts_from_the_next_request(
    client: httpx.AsyncClient, settings: Settings, lookups: Lookups
) -> None:
    registered = await machine(settings, auth_method="client_secret_post")
    await until_kept(client, registered, lookups)
    secret = await rotated(settings, registered)
    refused = await ask_token(client, registered)
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"
    assert (await ask_token(client, registered, secret)).status_code == 200


async def test_a_change_redis_could_not_announce_counts_within_the_kept_bound(
    client: httpx.AsyncClient,
    settings: Settings,
    lookups: Lookups,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(clients, "KEPT_CLIENT_SECONDS", 1.0)
    registered = await machine(settings, auth_method="client_secret_post")
    await until_kept(client, registered, lookups)
    with socket.socket() as closed:  # a port nothing listens on: Redis is unreachable
        closed.bind(("127.0.0.1", 0))
        unreachable = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"
    cut_off = settings_beside(settings, tmp_path, redis_url=unreachable, redis_timeout=0.2)
    secret = await rotated(cut_off, registered)
    assert "Redis could not announce it" in caplog.text
    assert registered.client.client_id in caplog.text
    since = time.monotonic()
    while (await ask_token(client, registered)).status_code == 200:
        assert time.monotonic() - since < 1.0 + 0.5, "the old secret outlived the bound"
        await asyncio.sleep(0.05)
    assert (await ask_token(client, registered, secret)).status_code == 200


async def test_one_request_naming_two_clients_is_served_as_the_one_it_proves(
    client: httpx.AsyncClient, settings: Settings, lookups: Lookups
) -> None:
    basic = await machine(settings)
    post = await machine(settings, auth_method="client_secret_post")
    response = await client.post(
        TOKEN,
        data={
            "grant_type": "client_credentials",
            "client_id": post.client.client_id,
            "client_secret": post.secret or "",
        },
        # Wrong Basic credentials: Authlib then tries the form's.
        auth=(basic.client.client_id, "not the secret"),
    )
    assert response.status_code == 200, response.text
    assert lookups.ids == [[basic.client.client_id], [post.client.client_id]]
    assert lookups.sites == [on_the_loop()] * 2


def basic(raw: bytes) -> list[tuple[bytes, bytes]]:
    """An Authorization header carrying raw bytes as Basic credentials."""
    return [(b"authorization", b"Basic " + base64.b64encode(raw))]


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"grant_type=client_credentials&client_id=" + b"x" * 129 + b"&client_secret=s", []),
        (b"grant_type=client_credentials&client_id=%00&client_secret=s", []),
        (b"grant_type=client_credentials&client_id=a%0d%0ab&client_secret=s", []),
        (b"grant_type=client_credentials&client_id=%ff&client_secret=s", []),
        (b"grant_type=client_credentials&client_id=\xff&client_secret=s", []),
        (b"grant_type=client_credentials", basic(b"x" * 129 + b":s")),
        (b"grant_type=client_credentials", basic(b"a\x00:s")),
        (b"grant_type=client_credentials", basic(b"\xff\xfe:s")),
        (b"grant_type=client_credentials", [(b"authorization", b"Basic !!!")]),
    ],
)
async def test_hostile_client_ids_get_json_errors_and_are_never_looked_up(
    client: httpx.AsyncClient,
    lookups: Lookups,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
) -> None:
    response = await client.post(
        TOKEN, content=body, headers=[(b"content-type", FORM.encode()), *headers]
    )
    assert response.status_code in {400, 401}, response.text
    assert response.json()["error"] in {"invalid_client", "unsupported_grant_type"}
    # Only printable ids of bounded length reach PostgreSQL (%ff arrives as U+FFFD, say).
    looked_up = [name for call in lookups.ids for name in call]
    assert all(plausible_identifier(name) for name in looked_up), looked_up


def environ(body: bytes = b"", authorization: str | None = None, **extra: Any) -> dict[str, Any]:
    """A POST environ as the adapter builds it."""
    values: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": TOKEN,
        "CONTENT_TYPE": FORM,
        "wsgi.input": io.BytesIO(body),
        **extra,
    }
    if authorization is not None:
        values["HTTP_AUTHORIZATION"] = authorization
    return values


def test_the_client_ids_a_request_names() -> None:
    def credentials(raw: str) -> str:
        return "Basic " + base64.b64encode(raw.encode()).decode()

    assert named_clients(environ(b"client_id=b&client_id=c", credentials("a:s"))) == ["a", "b"]
    assert named_clients(environ(b"client_id=a", credentials("a:s"))) == ["a"]
    assert named_clients(environ(authorization=credentials("a%3Ab:s"))) == ["a:b"]
    assert named_clients(environ(b"client_id=a+b%2B")) == ["a b+"]
    # Basic credentials without a secret are not used by Authlib: they name no client.
    assert named_clients(environ(authorization=credentials("a:"))) == []
    assert named_clients(environ(authorization=credentials("a"))) == []
    assert named_clients(environ(authorization="Bearer abc")) == []
    assert named_clients(environ(b"client_id=")) == []
    assert named_clients(environ(b"client_id=a", CONTENT_TYPE="multipart/form-data")) == []
    assert named_clients(environ(b"client_id=a&x=" + b"y" * MAX_FORM_BYTES)) == []
    assert named_clients(environ(b"client_id=%00")) == []


async def test_a_token_due_a_key_reread_is_signed_after_it_on_the_loop(
    settings: Settings, captured_app: list[Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    registered = await machine(settings)
    async with serve_in_process(settings) as http:
        keyring: keys.Keyring = captured_app[0].extensions["oauth_keyring"]
        rereads: list[str] = []
        signed: list[tuple[Site, int]] = []  # where, and how many rereads had ended by then
        load, signing_key = keyring.load, keyring.signing_key

        async def counted_load() -> None:
            rereads.append("started")
            await load()
            rereads.append("ended")

        def counted_signing_key() -> keys.Key:
            where = site()
            key = signing_key()
            signed.append((where, rereads.count("ended")))
            return key

        monkeypatch.setattr(keyring, "load", counted_load)
        monkeypatch.setattr(keyring, "signing_key", counted_signing_key)
        assert (await ask_token(http, registered)).status_code == 200
        keyring._loaded_at = time.monotonic() - keys.SIGNER_RELOAD_SECONDS
        response = await ask_token(http, registered)
        assert response.status_code == 200, response.text
        assert response.json()["access_token"]
        assert time.monotonic() - keyring._loaded_at < keys.SIGNER_RELOAD_SECONDS
        assert (await ask_token(http, registered)).status_code == 200
    # The second request waited for the reread before signing, suspended on the loop.
    assert rereads == ["started", "ended"]
    assert signed == [(on_the_loop(), 0), (on_the_loop(), 1), (on_the_loop(), 1)]


async def test_a_failed_client_authentication_is_counted_from_the_loop(
    settings: Settings,
    tmp_path: Path,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limited = settings_beside(settings, tmp_path, redis_prefix=prefix, client_failures_per_client=2)
    registered = await machine(limited)
    auth = (registered.client.client_id, "not the secret")
    counted = record_sites(monkeypatch, client_throttle, "counted")
    async with serve_in_process(limited) as http:
        answers = [await ask_token(http, registered, auth[1]) for _ in range(3)]
        introspect = await http.post("/oauth/introspect", data={"token": "x"}, auth=auth)
    assert [a.status_code for a in answers] == [401, 401, 429]
    assert answers[0].json()["error"] == "invalid_client"
    assert answers[2].json()["error"] == "slow_down"
    assert int(answers[2].headers["retry-after"]) > 0
    assert (introspect.status_code, introspect.json()["error"]) == (429, "slow_down")
    assert counted == [on_the_loop()] * 4


async def test_outside_a_request_nothing_waits_on_the_event_loop(settings: Settings) -> None:
    app = create_app(settings)
    loop: WorkerLoop = app.extensions["loop"]
    loop.attach()  # as the server's start-up does
    keyring: keys.Keyring = app.extensions["oauth_keyring"]
    try:
        assert on_event_loop() and loop.in_loop_thread()
        assert not suspendable() and not loop.can_wait()
        await keyring.load()
        with app.app_context():
            assert keyring.signing_key()  # fresh keys: nothing to wait for
            with pytest.raises(WouldBlock):
                bridge.run(asyncio.sleep(0))
            keyring._loaded_at = time.monotonic() - keys.SIGNER_RELOAD_SECONDS
            with pytest.raises(RuntimeError, match="reread"):
                keyring.signing_key()

        def request() -> keys.Key:
            """The same calls as a request's view makes them: suspended where they wait."""
            with app.app_context():
                assert suspendable() and loop.can_wait()
                assert bridge.run(asyncio.sleep(0, "waited")) == "waited"
                return keyring.signing_key()

        assert await run_suspendable(request)
        assert time.monotonic() - keyring._loaded_at < keys.SIGNER_RELOAD_SECONDS
        assert not await asyncio.to_thread(on_event_loop)
        assert threading.current_thread() is threading.main_thread()
    finally:
        await asyncio.to_thread(close_app, app)


def on_event_loop() -> bool:
    """Whether the caller runs on a thread's running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True

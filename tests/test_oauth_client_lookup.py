"""Clients looked up on the event loop before the token, revocation and introspection views."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from flask import Flask

from service import close_app, create_app
from service.config import Settings
from service.loop import WorkerLoop, WouldBlock, on_event_loop
from service.oauth import bridge, keys, prefetch
from service.oauth import server as oauth_server
from service.oauth.clients import (
    Registered,
    delete_client,
    find_clients,
    plausible_identifier,
    rotate_secret,
)
from service.oauth.models import Client
from service.oauth.prefetch import ENVIRON_KEY, MAX_FORM_BYTES, named_clients
from service.store import Store
from service.store.db import Database
from tests.conftest import serve_in_process
from tests.oauth_helpers import new_client

TOKEN = "/oauth/token"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The client ids that views looked up themselves, through the app's loop."""
    calls: list[list[str]] = []

    def counting(*, database: Database, client_ids: Sequence[str]) -> Any:
        calls.append(list(client_ids))
        return find_clients(database=database, client_ids=client_ids)

    monkeypatch.setattr(oauth_server, "find_clients", counting)
    return calls


@pytest.fixture
def prefetches(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The client ids looked up ahead, on the event loop."""
    calls: list[list[str]] = []
    original = prefetch.find_clients

    async def recording(*, database: Database, client_ids: Sequence[str]) -> Any:
        calls.append(list(client_ids))
        return await original(database=database, client_ids=client_ids)

    monkeypatch.setattr(prefetch, "find_clients", recording)
    return calls


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Where query_client ran, each time: "loop" (the server's event loop) or "thread"."""
    ran: list[str] = []
    original = prefetch.prefetched

    def recording(environ: dict[str, Any], client_id: str) -> tuple[bool, Client | None]:
        ran.append("loop" if on_event_loop() else "thread")
        return original(environ, client_id)

    monkeypatch.setattr(prefetch, "prefetched", recording)
    return ran


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
async def test_a_token_request_uses_the_client_looked_up_ahead(
    client: httpx.AsyncClient,
    settings: Settings,
    lookups: list[list[str]],
    prefetches: list[list[str]],
    auth_method: str,
) -> None:
    registered = await machine(settings, auth_method=auth_method)
    response = await ask_token(client, registered)
    assert response.status_code == 200, response.text
    assert prefetches == [[registered.client.client_id]]
    assert lookups == []


async def test_revocation_and_introspection_use_it_too(
    client: httpx.AsyncClient,
    settings: Settings,
    lookups: list[list[str]],
    prefetches: list[list[str]],
) -> None:
    registered = await machine(settings)
    auth = (registered.client.client_id, registered.secret or "")
    token = (await ask_token(client, registered)).json()["access_token"]
    seen = await client.post("/oauth/introspect", data={"token": token}, auth=auth)
    assert seen.json()["active"] is True
    assert (await client.post("/oauth/revoke", data={"token": token}, auth=auth)).status_code == 200
    seen = await client.post("/oauth/introspect", data={"token": token}, auth=auth)
    assert seen.json() == {"active": False}
    assert prefetches == [[registered.client.client_id]] * 4
    assert lookups == []


async def test_a_deleted_client_is_refused_from_the_next_request(
    client: httpx.AsyncClient, settings: Settings, lookups: list[list[str]]
) -> None:
    registered = await machine(settings)
    assert (await ask_token(client, registered)).status_code == 200
    store = Store(settings, WorkerLoop())
    try:
        assert await delete_client(store=store, client_id=registered.client.client_id)
    finally:
        await store.close()
    refused = await ask_token(client, registered)
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"
    assert lookups == []


async def test_a_rotated_secret_counts_from_the_next_request(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    registered = await machine(settings, auth_method="client_secret_post")
    assert (await ask_token(client, registered)).status_code == 200
    database = Database(settings)
    try:
        secret = await rotate_secret(database=database, client_id=registered.client.client_id)
    finally:
        await database.dispose()
    assert secret is not None
    refused = await ask_token(client, registered)
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"
    assert (await ask_token(client, registered, secret)).status_code == 200


async def test_one_request_naming_two_clients_gets_both_looked_up_at_once(
    client: httpx.AsyncClient,
    settings: Settings,
    lookups: list[list[str]],
    prefetches: list[list[str]],
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
    assert prefetches == [[basic.client.client_id, post.client.client_id]]
    assert lookups == []


async def test_a_client_not_looked_up_ahead_is_looked_up_by_the_view(
    client: httpx.AsyncClient,
    settings: Settings,
    lookups: list[list[str]],
    prefetches: list[list[str]],
) -> None:
    registered = await machine(settings, auth_method="client_secret_post")
    # A multipart form is left to the view to parse.
    response = await client.post(
        TOKEN,
        files={"grant_type": (None, "client_credentials")},
        data={"client_id": registered.client.client_id, "client_secret": registered.secret},
    )
    assert response.status_code == 200, response.text
    assert prefetches == []
    assert lookups == [[registered.client.client_id]]


async def test_only_the_ids_looked_up_ahead_are_answered_from_it(
    settings: Settings, lookups: list[list[str]]
) -> None:
    registered = await machine(settings)
    real = registered.client
    other = Client(
        client_id="another-client",
        name="a client looked up for this request",
        secret_hash=None,
        redirect_uris=(),
        grant_types=(),
        scope="",
        auth_method="none",
    )
    app = create_app(settings)

    def query(client_id: str) -> Client | None:
        answer = {other.client_id: other, "gone": None}
        with app.test_request_context(TOKEN, environ_overrides={ENVIRON_KEY: answer}):
            found: Client | None = app.extensions["oauth_server"].query_client(client_id)
            return found

    try:
        assert await asyncio.to_thread(query, other.client_id) is other
        assert await asyncio.to_thread(query, "gone") is None
        assert lookups == []
        assert await asyncio.to_thread(query, real.client_id) == real
        assert lookups == [[real.client_id]]
    finally:
        await asyncio.to_thread(close_app, app)


async def test_a_failed_lookup_ahead_leaves_it_to_the_view(
    client: httpx.AsyncClient,
    settings: Settings,
    lookups: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registered = await machine(settings)

    async def failing(*, database: Database, client_ids: Sequence[str]) -> Any:
        raise OSError("connection refused")

    monkeypatch.setattr(prefetch, "find_clients", failing)
    assert (await ask_token(client, registered)).status_code == 200
    assert lookups == [[registered.client.client_id]]


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
    lookups: list[list[str]],
    prefetches: list[list[str]],
    body: bytes,
    headers: list[tuple[bytes, bytes]],
) -> None:
    response = await client.post(
        TOKEN, content=body, headers=[(b"content-type", FORM.encode()), *headers]
    )
    assert response.status_code in {400, 401}, response.text
    assert response.json()["error"] in {"invalid_client", "unsupported_grant_type"}
    looked_up = [name for call in lookups + prefetches for name in call]
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
    # Basic credentials without a secret are not used by Authlib: nothing to look up.
    assert named_clients(environ(authorization=credentials("a:"))) == []
    assert named_clients(environ(authorization=credentials("a"))) == []
    assert named_clients(environ(authorization="Bearer abc")) == []
    assert named_clients(environ(b"client_id=")) == []
    assert named_clients(environ(b"client_id=a", CONTENT_TYPE="multipart/form-data")) == []
    assert named_clients(environ(b"client_id=a&x=" + b"y" * MAX_FORM_BYTES)) == []


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_a_client_credentials_request_runs_on_the_event_loop(
    client: httpx.AsyncClient, settings: Settings, threads: list[str], auth_method: str
) -> None:
    registered = await machine(settings, auth_method=auth_method)
    response = await ask_token(client, registered)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert threads == ["loop"]
    wrong = await ask_token(client, registered, "not the secret")
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"
    # Counting the failure needs Redis: the request stops there and runs again in a thread.
    assert threads[1:] == ["loop", "thread"]


async def test_other_requests_run_in_a_thread(
    client: httpx.AsyncClient, settings: Settings, threads: list[str]
) -> None:
    registered = await machine(settings)
    auth = (registered.client.client_id, registered.secret or "")
    form = {"grant_type": "client_credentials"}
    assert (await client.post(TOKEN + "?scope=profile", data=form, auth=auth)).status_code == 200
    refresh = {"grant_type": "refresh_token", "refresh_token": "unknown"}
    assert (await client.post(TOKEN, data=refresh, auth=auth)).status_code == 400
    assert (await client.post("/oauth/revoke", data={"token": "x"}, auth=auth)).status_code == 200
    assert set(threads) == {"thread"}


async def test_a_token_due_a_key_reread_is_signed_in_a_thread(
    settings: Settings, captured_app: list[Flask], threads: list[str]
) -> None:
    registered = await machine(settings)
    async with serve_in_process(settings) as http:
        keyring = captured_app[0].extensions["oauth_keyring"]
        assert (await ask_token(http, registered)).status_code == 200
        keyring._loaded_at = time.monotonic() - keys.SIGNER_RELOAD_SECONDS
        assert (await ask_token(http, registered)).status_code == 200
        assert (await ask_token(http, registered)).status_code == 200
    # The reread was waited for in a thread; the next request signs on the loop again.
    assert threads == ["loop", "thread", "loop"]


async def test_nothing_waits_for_the_store_on_the_event_loop(settings: Settings) -> None:
    app = create_app(settings)
    app.extensions["loop"].attach()  # as the server's start-up does
    keyring: keys.Keyring = app.extensions["oauth_keyring"]
    try:
        assert on_event_loop()
        assert not keyring.signs_without_waiting()  # never loaded
        with app.app_context():
            with pytest.raises(WouldBlock):
                bridge.run(asyncio.sleep(0))
            with pytest.raises(RuntimeError):
                keyring.signing_key()
        assert not await asyncio.to_thread(on_event_loop)
        assert threading.current_thread() is threading.main_thread()
    finally:
        await asyncio.to_thread(close_app, app)

"""Account administration: email addresses, the registration switch, and `users` commands.

The commands run as subprocesses against the same PostgreSQL and Redis as the in-process
app, so a token they revoke is checked on the app's real path (kept verdicts, the feed).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from subprocess import CompletedProcess

import httpx
import psycopg
import pytest
from alembic import command

from service.auth import admin
from service.config import Settings
from service.ids import new_id
from service.loop import WorkerLoop
from service.store import Store
from service.store import sessions as session_store
from service.store import users as user_store
from service.store.blocklist import TokenRef, Verdict
from service.store.migrate import alembic_config, upgrade
from service.store.models import utcnow
from tests.cli_helpers import run_cli, run_cli_async
from tests.conftest import (
    Session,
    fresh_database,
    login,
    make_settings,
    register,
    serve_in_process,
    settings_beside,
)
from tests.oauth_helpers import (
    REDIRECT,
    authorization_code,
    bearer,
    browser,
    new_client,
    pkce,
    query_of,
    sign_in_and_consent,
)

PASSWORD = "correct horse battery"


def one_line(result: CompletedProcess[str], stream: str = "stdout") -> str:
    """The single line a command printed on stream."""
    lines = getattr(result, stream).strip().splitlines()
    assert len(lines) == 1, (result.stdout, result.stderr)
    return str(lines[0])


def unique(prefix: str = "acct") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def hello(http: httpx.AsyncClient, session: Session) -> int:
    return (await http.get("/api/hello", headers=session.bearer())).status_code


# Email addresses


async def test_register_with_an_email_and_read_it_back(client: httpx.AsyncClient) -> None:
    username = unique()
    response = await client.post(
        "/auth/register",
        json={"username": username, "password": PASSWORD, "email": "Ada.Lovelace@Example.ORG"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["email"] == "Ada.Lovelace@example.org"  # the domain's case goes
    session = await login(client, username, PASSWORD)
    email = await client.get("/api/email", headers=session.bearer())
    assert email.status_code == 200
    assert email.json() == {"sub": response.json()["id"], "email": "Ada.Lovelace@example.org"}
    me = (await client.get("/auth/me", headers=session.bearer())).json()
    assert me == {"id": response.json()["id"], "username": username, "email": me["email"]}
    no_email = await login(client, await register(client, PASSWORD), PASSWORD)
    assert (await client.get("/api/email", headers=no_email.bearer())).json()["email"] is None
    assert (await client.get("/api/email")).status_code == 401


async def test_an_email_is_unique_regardless_of_case(client: httpx.AsyncClient) -> None:
    address = f"{unique('taken')}@example.com"
    first = unique()
    created = await client.post(
        "/auth/register", json={"username": first, "password": PASSWORD, "email": address}
    )
    assert created.status_code == 201
    second = unique()
    response = await client.post(
        "/auth/register",
        json={"username": second, "password": PASSWORD, "email": address.upper()},
    )
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    text = response.text.lower()
    assert address.lower() not in text and first.lower() not in text  # nothing about the owner
    assert "email" in response.json()["detail"]
    # Nothing was created for the refused registration.
    refused = await client.post("/auth/login", json={"username": second, "password": PASSWORD})
    assert refused.status_code == 401


@pytest.mark.parametrize(
    "email",
    [
        "",
        "plainaddress",
        "a@b",
        "a@@example.com",
        "a@b@example.com",
        "a b@example.com",
        " a@example.com",
        ".a@example.com",
        "a.@example.com",
        "a..b@example.com",
        '"quoted"@example.com',
        "a@-example.com",
        "a@example-.com",
        "a@exa_mple.com",
        "a@example..com",
        "a@example.123",
        "a@[127.0.0.1]",
        "üser@example.com",
        "a@exämple.com",
        "a\n@example.com",
        "x" * 65 + "@example.com",
        "a@" + "b" * 64 + ".com",
        "a@" + ("b" * 62 + ".") * 4 + "com",  # 257 characters in all
        12345,
        ["a@example.com"],
    ],
)
async def test_register_refuses_an_invalid_email(client: httpx.AsyncClient, email: object) -> None:
    response = await client.post(
        "/auth/register", json={"username": unique(), "password": PASSWORD, "email": email}
    )
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"].startswith("email")


@pytest.mark.parametrize(
    "email",
    ["a@example.com", "first.last+tag@sub.example.co.uk", "o'brien@example.ie", "x@a-b.io"],
)
async def test_register_accepts_valid_emails(client: httpx.AsyncClient, email: str) -> None:
    local, _, domain = email.partition("@")
    address = f"{local}.{uuid.uuid4().hex[:6]}@{domain}"
    response = await client.post(
        "/auth/register", json={"username": unique(), "password": PASSWORD, "email": address}
    )
    assert response.status_code == 201, response.text


async def test_a_user_changes_and_removes_their_email(
    client: httpx.AsyncClient, user: Session
) -> None:
    address = f"{unique('mine')}@example.com"
    change = {"email": address, "current_password": user.password}
    wrong = await client.post(
        "/auth/email", json={**change, "current_password": "not my password"}, headers=user.bearer()
    )
    assert wrong.status_code == 403
    done = await client.post("/auth/email", json=change, headers=user.bearer())
    assert done.status_code == 200, done.text
    assert done.json()["email"] == address
    assert (await client.get("/api/email", headers=user.bearer())).json()["email"] == address

    other = await login(client, await register(client, PASSWORD), PASSWORD)
    taken = await client.post(
        "/auth/email",
        json={"email": address.upper(), "current_password": PASSWORD},
        headers=other.bearer(),
    )
    assert taken.status_code == 409
    assert address not in taken.text

    removed = await client.post(
        "/auth/email",
        json={"email": None, "current_password": user.password},
        headers=user.bearer(),
    )
    assert removed.status_code == 200 and removed.json()["email"] is None
    # Free again: the other account may now take it.
    again = await client.post(
        "/auth/email", json={"email": address, "current_password": PASSWORD}, headers=other.bearer()
    )
    assert again.status_code == 200
    invalid = await client.post(
        "/auth/email", json={"email": "nope", "current_password": PASSWORD}, headers=other.bearer()
    )
    assert invalid.status_code == 400


# The registration switch


async def test_closed_registration_is_403_and_the_cli_still_creates(
    settings: Settings, tmp_path: Path
) -> None:
    closed = settings_beside(settings, tmp_path, registration_open=False)
    username = unique("closed")
    async with serve_in_process(closed) as http:
        for body in ({"username": username, "password": PASSWORD}, {"not": "valid"}):
            response = await http.post("/auth/register", json=body)
            assert response.status_code == 403
            assert response.headers["content-type"] == "application/problem+json"
            assert "closed" in response.json()["detail"]
        created = await run_cli_async(
            settings,
            "users",
            "create",
            username,
            "--email",
            f"{username}@example.com",
            "--password-stdin",
            stdin=f"{PASSWORD}\n",
            REGISTRATION_OPEN="false",
        )
        assert created.returncode == 0, created.stderr
        assert one_line(created).startswith(f"created {username} (")
        session = await login(http, username, PASSWORD)  # signing in is unaffected
        email = await http.get("/api/email", headers=session.bearer())
        assert email.json()["email"] == f"{username}@example.com"


# Disable, enable


async def test_disable_refuses_live_tokens_at_once_and_enable_restores_sign_in(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    username = await register(client, PASSWORD)
    first, second = await login(client, username, PASSWORD), await login(client, username, PASSWORD)
    for session in (first, second):
        assert await hello(client, session) == 200
        assert await hello(client, session) == 200  # now a kept verdict, if the worker keeps one

    result = await run_cli_async(settings, "users", "disable", username)
    assert result.returncode == 0, result.stderr
    assert one_line(result).startswith(f"disabled {username} (")

    for session in (first, second):
        refused = await client.get("/api/hello", headers=session.bearer())
        assert refused.status_code == 401
        assert refused.json()["detail"] == "The token has been revoked."
        renewed = await client.post("/auth/refresh", headers=session.bearer(session.refresh))
        assert renewed.status_code == 401
    # Signing in is refused exactly as a wrong password is.
    right = await client.post("/auth/login", json={"username": username, "password": PASSWORD})
    wrong = await client.post("/auth/login", json={"username": username, "password": "wrong pw"})
    assert right.status_code == wrong.status_code == 401
    assert right.json() == wrong.json()

    shown = await run_cli_async(settings, "users", "show", username.upper())
    assert shown.returncode == 0, shown.stderr
    details = json.loads(shown.stdout)
    assert details["disabled"] is True and details["disabled_at"]
    assert details["open_sessions"] == 0
    assert "hash" not in shown.stdout and "argon2" not in shown.stdout

    again = await run_cli_async(settings, "users", "disable", username)
    assert again.returncode == 0 and "already" in one_line(again)

    enabled = await run_cli_async(settings, "users", "enable", details["id"])
    assert enabled.returncode == 0, enabled.stderr
    assert one_line(enabled).startswith(f"enabled {username} (")
    assert await hello(client, first) == 401  # earlier tokens stay revoked
    # The cutoff runs a few seconds ahead of the clock (admin.AHEAD_MS): sessions begun
    # within it count as begun before the account was disabled.
    await asyncio.sleep(admin.AHEAD_MS / 1000)
    fresh = await login(client, username, PASSWORD)
    assert await hello(client, fresh) == 200


async def test_a_disabled_account_gets_no_oauth_tokens_and_its_browser_sign_in_ends(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    verifier, challenge = pkce()
    url = "/oauth/authorize?" + str(
        httpx.QueryParams(
            response_type="code",
            client_id=registered.client.client_id,
            redirect_uri=REDIRECT,
            scope="profile email",
            code_challenge=challenge,
            code_challenge_method="S256",
        )
    )
    async with browser(client) as agent:
        code = query_of(await sign_in_and_consent(agent, url, user.username, user.password))["code"]
        result = await run_cli_async(settings, "users", "disable", user.username)
        assert result.returncode == 0, result.stderr
        # The browser's sign-in no longer counts: the login page is shown again.
        page = await agent.get(url)
        assert page.status_code == 302 and "/oauth/login" in page.headers["location"]
    auth = (registered.client.client_id, str(registered.secret))
    redeemed = await client.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        },
        auth=auth,
    )
    assert redeemed.status_code == 400
    assert redeemed.json()["error"] == "invalid_grant"


async def test_a_login_racing_a_disable_ends_revoked(settings: Settings) -> None:
    """A login that checked the account just before it was disabled: its session is covered.

    The login's check holds the row (FOR SHARE) until it commits; disabling waits for it
    and takes its cutoff after, so the session's id falls under the cutoff.
    """
    store = Store(settings, WorkerLoop())
    try:
        await store.warm_up()
        async with store.db.session() as session:
            account = await user_store.create_user(
                session, username=unique("race"), password_hash="x"
            )
        async with store.db.session() as session:
            assert await user_store.lock_enabled(session, user_id=account.id)
            disabling = asyncio.create_task(admin.disable(store=store, user_id=account.id))
            await asyncio.sleep(0.5)
            assert not disabling.done()  # waiting for the login to commit
            sid = new_id()
            await session_store.open_session(
                session,
                sid=sid,
                user_id=account.id,
                refresh_jti=new_id(),
                expires_at=utcnow() + timedelta(hours=1),
            )
        assert await asyncio.wait_for(disabling, 10) is True
        soon = int(time.time()) + 600
        ref = TokenRef(jti=new_id(), exp=soon, sid=sid, sxp=soon, sub=str(account.id))
        assert await store.check(ref) is Verdict.REVOKED
        async with store.db.session() as session:
            assert not await user_store.lock_enabled(session, user_id=account.id)
    finally:
        await store.close()


# Delete, revoke-sessions, set-password


async def test_delete_revokes_tokens_and_removes_oauth_grants(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    registered = await new_client(settings)
    code, verifier = await authorization_code(
        client, registered.client.client_id, user.username, user.password, "profile email"
    )
    auth = (registered.client.client_id, str(registered.secret))
    oauth = (
        await client.post(
            "/oauth/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT,
                "code_verifier": verifier,
            },
            auth=auth,
        )
    ).json()
    assert (
        await client.get("/api/email", headers=bearer(oauth["access_token"]))
    ).status_code == 200
    assert await hello(client, user) == 200
    shown = json.loads((await run_cli_async(settings, "users", "show", user.username)).stdout)
    assert shown["open_sessions"] == 1 and shown["live_oauth_grants"] == 1

    unconfirmed = await run_cli_async(settings, "users", "delete", user.username)
    assert unconfirmed.returncode == 1 and "--yes" in one_line(unconfirmed, "stderr")
    assert await hello(client, user) == 200

    deleted = await run_cli_async(settings, "users", "delete", user.username, "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert one_line(deleted).startswith(f"deleted {user.username} (")
    assert await hello(client, user) == 401
    assert (
        await client.get("/api/hello", headers=bearer(oauth["access_token"]))
    ).status_code == 401
    renewed = await client.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": oauth["refresh_token"]},
        auth=auth,
    )
    assert renewed.status_code == 400 and renewed.json()["error"] == "invalid_grant"
    gone = await run_cli_async(settings, "users", "show", user.username)
    assert gone.returncode == 1
    assert one_line(gone, "stderr") == f"no such user: {user.username}"
    # The name is free again, for a new account whose tokens are not the old one's.
    again = await client.post(
        "/auth/register", json={"username": user.username, "password": PASSWORD}
    )
    assert again.status_code == 201


async def test_revoke_sessions_ends_every_device(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    username = await register(client, PASSWORD)
    first, second = await login(client, username, PASSWORD), await login(client, username, PASSWORD)
    assert await hello(client, first) == 200 and await hello(client, second) == 200
    result = await run_cli_async(settings, "users", "revoke-sessions", username)
    assert result.returncode == 0, result.stderr
    assert one_line(result).startswith(f"revoked every session of {username} (")
    assert await hello(client, first) == 401 and await hello(client, second) == 401
    refreshed = await client.post("/auth/refresh", headers=first.bearer(first.refresh))
    assert refreshed.status_code == 401
    await asyncio.sleep(0.01)  # a session begun in the cutoff's millisecond is covered too
    assert await hello(client, await login(client, username, PASSWORD)) == 200


async def test_set_password_from_stdin_revokes_sessions(
    client: httpx.AsyncClient, settings: Settings, user: Session
) -> None:
    assert await hello(client, user) == 200
    short = await run_cli_async(
        settings, "users", "set-password", user.username, "--password-stdin", stdin="short\n"
    )
    assert short.returncode == 1
    assert one_line(short, "stderr").startswith("invalid password")
    assert await hello(client, user) == 200  # nothing changed

    new_password = "a brand new passphrase"
    result = await run_cli_async(
        settings,
        "users",
        "set-password",
        user.username,
        "--password-stdin",
        stdin=f"{new_password}\n",
    )
    assert result.returncode == 0, result.stderr
    assert one_line(result).startswith(f"set the password of {user.username} (")
    assert new_password not in result.stdout + result.stderr
    assert await hello(client, user) == 401
    old = await client.post("/auth/login", json={"username": user.username, "password": PASSWORD})
    assert old.status_code == 401
    await asyncio.sleep(0.01)
    assert await hello(client, await login(client, user.username, new_password)) == 200


# The command line itself


def test_list_and_set_email(settings: Settings) -> None:
    username = unique("listed")
    created = run_cli(
        settings, "users", "create", username, "--password-stdin", stdin="long enough\n"
    )
    assert created.returncode == 0, created.stderr
    address = f"{username}@Example.com"
    set_email = run_cli(settings, "users", "set-email", username, address)
    assert set_email.returncode == 0, set_email.stderr
    assert one_line(set_email).endswith(f"to {username}@example.com")
    before = username[:-1]  # sorts just before it
    listed = run_cli(settings, "users", "list", "--after", before, "--limit", "1")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry == {
        "id": entry["id"],
        "username": username,
        "email": f"{username}@example.com",
        "disabled": False,
    }
    invalid = run_cli(settings, "users", "set-email", username, "not-an-address")
    assert invalid.returncode == 1
    assert one_line(invalid, "stderr").startswith("invalid email address")
    removed = run_cli(settings, "users", "set-email", username, "--remove")
    assert removed.returncode == 0 and "removed" in one_line(removed)
    taken = run_cli(
        settings, "users", "create", username, "--password-stdin", stdin="long enough\n"
    )
    assert taken.returncode == 1 and "is taken" in one_line(taken, "stderr")


@pytest.mark.parametrize(
    "action", ["show", "disable", "enable", "revoke-sessions", "set-email", "delete"]
)
def test_an_unknown_user_is_one_line_and_status_1(settings: Settings, action: str) -> None:
    extra = {"set-email": ["a@example.com"], "delete": ["--yes"]}.get(action, [])
    result = run_cli(settings, "users", action, "nobody_by_this_name", *extra)
    assert result.returncode == 1
    assert one_line(result, "stderr") == "no such user: nobody_by_this_name"
    assert result.stdout == ""


def test_an_unreachable_database_is_one_line_and_status_1(settings: Settings) -> None:
    result = run_cli(
        settings,
        "users",
        "disable",
        "anyone",
        DATABASE_URL="postgresql://authsvc@127.0.0.1:1/authsvc",
    )
    assert result.returncode == 1
    line = one_line(result, "stderr")
    assert line.startswith("database unavailable:") and "Traceback" not in result.stderr


async def test_redis_unreachable_is_recorded_and_one_line(
    settings: Settings, prefix: str, postgres_server: str, tmp_path: Path
) -> None:
    """On a database of its own: a revocation Redis lacks would fail the shared app closed."""
    with fresh_database(postgres_server) as url:
        own = make_settings(tmp_path, database_url=url, redis_url="redis://127.0.0.1:1/0")
        await asyncio.to_thread(upgrade, own)
        created = await run_cli_async(
            own, "users", "create", "bob", "--password-stdin", stdin=f"{PASSWORD}\n"
        )
        assert created.returncode == 0, created.stderr
        result = await run_cli_async(own, "users", "disable", "bob")
        assert result.returncode == 1
        line = one_line(result, "stderr")
        assert line.startswith("disabled bob (") and "Redis could not be reached" in line
        assert result.stdout == ""
        recorded = (
            "SELECT count(*) FROM revocations WHERE kind = 'user' AND subject = "
            "(SELECT id::text FROM users WHERE username = 'bob')"
        )
        assert await asyncio.to_thread(count, url, recorded) == 1
        shown = json.loads((await run_cli_async(own, "users", "show", "bob")).stdout)
        assert shown["disabled"] is True

        # The command left a mark of what Redis lacks; a worker that reaches Redis writes it
        # back and drops the mark.
        marks = "SELECT count(*) FROM unwritten_revocations"
        assert await asyncio.to_thread(count, url, marks) == 1
        reachable = settings_beside(settings, tmp_path, database_url=url, redis_prefix=prefix)
        async with serve_in_process(reachable):
            deadline = time.monotonic() + 10
            while await asyncio.to_thread(count, url, marks):
                assert time.monotonic() < deadline, "the mark was never written back"
                await asyncio.sleep(0.1)


def count(url: str, query: str) -> int:
    """The one number a counting query answers."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


# The migration


def test_the_migration_gives_way_to_a_live_table(postgres_server: str, tmp_path: Path) -> None:
    """Waiting behind a long transaction, the migration never holds up other queries long.

    An ALTER TABLE queued for its lock blocks every query on the table after it; each
    attempt waits at most LOCK_TIMEOUT (2 s) before it gives way and tries again.
    """
    with fresh_database(postgres_server) as url:
        own = make_settings(tmp_path, database_url=url, redis_url="redis://127.0.0.1:1/0")
        upgrade(own, "0004")
        user_id = uuid.uuid4()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO users (id, username, username_key, password_hash, created_at, "
                "password_changed_at) VALUES (%s, 'Old', 'old', 'x', now(), now())",
                (user_id,),
            )
        holder = psycopg.connect(url)
        holder.execute("SELECT count(*) FROM users")  # a long transaction on the table
        migrating = threading.Thread(target=upgrade, args=(own, "0005"))
        migrating.start()
        try:
            time.sleep(0.5)
            # Bounded, so that a migration holding reads up fails here instead of hanging.
            with psycopg.connect(url, autocommit=True, options="-c statement_timeout=5000") as r:
                started = time.monotonic()
                r.execute("SELECT count(*) FROM users")
                waited = time.monotonic() - started
            assert waited < 3.5, f"a read waited {waited:.1f} s behind the migration"
            assert migrating.is_alive()
            time.sleep(5)
        finally:
            holder.close()
            migrating.join(60)
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0005",)
            row = conn.execute(
                "SELECT username, email, disabled_at FROM users WHERE id = %s", (user_id,)
            ).fetchone()
            assert row == ("Old", None, None)
            valid = conn.execute(
                "SELECT indisvalid, indisunique FROM pg_index "
                "WHERE indexrelid = 'uq_users_email_key'::regclass"
            ).fetchone()
            assert valid == (True, True)
        command.downgrade(alembic_config(own), "0004")
        upgrade(own)

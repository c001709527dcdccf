"""A request gives its database turn back while it waits for a password hash."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher

from service.adapter import AsgiAdapter
from service.config import Settings
from service.loop import WorkerLoop
from service.store.db import Database
from service.turns import BUSY, DATABASE_TURN, DatabaseTurn, TurnBusy, turn_given_back
from tests.conftest import login, register, serve_in_process, settings_beside

PASSWORD = "correct horse battery"
WRONG = "not the password"
TURNS = 2
# A database request while every login waits for its hash: a few of its own round trips.
PROMPTLY = 1.0
GIVE_UP = 20.0


class HashGate:
    """Holds every password check in the hashing pool while closed; counts those held."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self.held = 0

    def around(self, verify: Callable[..., Any]) -> Callable[..., Any]:
        """verify, waiting at the gate first (in a hashing thread)."""

        def gated(hasher: PasswordHasher, *args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.held += 1
            try:
                self._open.wait(GIVE_UP)
                return verify(hasher, *args, **kwargs)
            finally:
                with self._lock:
                    self.held -= 1

        return gated

    def close(self) -> None:
        """Hold the password checks that come from now on."""
        self._open.clear()

    def open(self) -> None:
        """Let every held password check run."""
        self._open.set()


class DatabaseMeter:
    """Counts the requests (by database turn) using the database at once, each for a while."""

    def __init__(self, linger: float = 0.0) -> None:
        self._linger = linger
        self._using: dict[int, int] = {}
        self.peak = 0
        self.unblocked = asyncio.Event()
        self.unblocked.set()
        self.blocked = 0

    def around(self, use: Callable[[Database], Any]) -> Callable[[Database], Any]:
        """Database.session or .statement, metered (and held while blocked)."""

        @asynccontextmanager
        async def metered(database: Database) -> AsyncIterator[Any]:
            turn = DATABASE_TURN.get()
            if turn is None:  # start-up and background work: no request
                async with use(database) as used:
                    yield used
                return
            self._enter(id(turn))
            try:
                await self._hold()
                async with use(database) as used:
                    yield used
            finally:
                self._leave(id(turn))

        return metered

    def _enter(self, request: int) -> None:
        self._using[request] = self._using.get(request, 0) + 1
        self.peak = max(self.peak, len(self._using))

    def _leave(self, request: int) -> None:
        self._using[request] -= 1
        if not self._using[request]:
            del self._using[request]

    async def _hold(self) -> None:
        if not self.unblocked.is_set():
            self.blocked += 1
            try:
                await self.unblocked.wait()
            finally:
                self.blocked -= 1
        await asyncio.sleep(self._linger)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[HashGate]:
    """Every password check in this test passes the gate; opened at the end."""
    hash_gate = HashGate()
    monkeypatch.setattr(PasswordHasher, "verify", hash_gate.around(PasswordHasher.verify))
    yield hash_gate
    hash_gate.open()


@pytest.fixture
def meter(monkeypatch: pytest.MonkeyPatch) -> DatabaseMeter:
    """Every database use in this test is metered."""
    database_meter = DatabaseMeter(linger=0.02)
    monkeypatch.setattr(Database, "session", database_meter.around(Database.session))
    monkeypatch.setattr(Database, "statement", database_meter.around(Database.statement))
    return database_meter


def few_turns(settings: Settings, tmp: Path, **overrides: Any) -> Settings:
    """The test backends, with TURNS database turns and room for four hashes at once."""
    values = {"database_max_requests": TURNS, "password_hash_threads": 4} | overrides
    return settings_beside(settings, tmp, **values)


async def sign_in(http: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    """POST /auth/login."""
    return await http.post("/auth/login", json={"username": username, "password": password})


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait until condition holds (GIVE_UP at most)."""
    deadline = time.monotonic() + GIVE_UP
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


async def settled(*requests: Awaitable[httpx.Response]) -> list[httpx.Response]:
    """Every response, in order; fails the test past GIVE_UP instead of hanging."""
    return await asyncio.wait_for(asyncio.gather(*requests), GIVE_UP)


async def timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    """The response and how long it took."""
    started = time.monotonic()
    response = await asyncio.wait_for(request, GIVE_UP)
    return response, time.monotonic() - started


async def test_a_refresh_is_answered_while_every_login_waits_for_its_hash(
    settings: Settings, tmp_path: Path, gate: HashGate
) -> None:
    server = serve_in_process(few_turns(settings, tmp_path, database_pool_timeout=2.0))
    async with server as http:
        user = await login(http, await register(http, PASSWORD), PASSWORD)
        gate.close()
        logins = [asyncio.create_task(sign_in(http, user.username, PASSWORD)) for _ in range(4)]
        await until(lambda: gate.held >= TURNS, "the logins reached the hashing pool")
        refreshed, elapsed = await timed(
            http.post("/auth/refresh", headers=user.bearer(user.refresh))
        )
        still_hashing = sum(not login.done() for login in logins)
        gate.open()
        answers = await settled(*logins)
    assert refreshed.status_code == 200, refreshed.text
    assert elapsed < PROMPTLY, f"the refresh waited {elapsed:.1f}s behind the logins"
    assert still_hashing == len(logins)
    assert [answer.status_code for answer in answers] == [200] * len(logins)


async def test_no_more_requests_than_turns_use_the_database_at_once(
    settings: Settings, tmp_path: Path, meter: DatabaseMeter
) -> None:
    server = serve_in_process(few_turns(settings, tmp_path, database_pool_timeout=10.0))
    async with server as http:
        username = await register(http, PASSWORD)
        sessions = [await login(http, username, PASSWORD) for _ in range(4)]
        meter.peak = 0
        storm = [
            *(sign_in(http, username, PASSWORD) for _ in range(8)),
            *(sign_in(http, username, WRONG) for _ in range(2)),
            *(http.post("/auth/refresh", headers=s.bearer(s.refresh)) for s in sessions),
            *(http.get("/auth/me", headers=s.bearer()) for s in sessions),
        ]
        answers = await settled(*storm)
        assert server.app.free_database_turns == TURNS
    statuses = [answer.status_code for answer in answers]
    assert statuses == [200] * 8 + [401] * 2 + [200] * 8, statuses
    assert meter.peak == TURNS


async def test_every_turn_is_free_after_failed_cancelled_and_shed_logins(
    settings: Settings,
    tmp_path: Path,
    gate: HashGate,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocker = DatabaseMeter()
    monkeypatch.setattr(Database, "session", blocker.around(Database.session))
    limits = {"database_pool_timeout": 0.5, "password_queue_limit": 4}
    server = serve_in_process(few_turns(settings, tmp_path, **limits))
    async with server as http:
        username = await register(http, PASSWORD)
        user = await login(http, username, PASSWORD)

        # Four logins wait for their hashes, one of them abandoned by its client; a fifth
        # finds the hashing queue full.
        gate.close()
        passwords = [PASSWORD, PASSWORD, WRONG, PASSWORD]
        logins = [asyncio.create_task(sign_in(http, username, p)) for p in passwords]
        await until(lambda: gate.held == len(logins), "every login waits for its hash")
        shed = await sign_in(http, username, PASSWORD)
        logins.pop().cancel()

        # Meanwhile every turn goes to a request the database holds: no login gets its
        # turn back in time.
        blocker.unblocked.clear()
        held = [asyncio.create_task(http.get("/auth/me", headers=user.bearer())) for _ in range(2)]
        await until(lambda: blocker.blocked == TURNS, "every turn is held")
        gate.open()
        refused = await settled(*logins)
        blocker.unblocked.set()
        served = await settled(*held)
        await until(lambda: gate.held == 0, "the abandoned login's hash ended")
        await until(lambda: server.app.free_database_turns == TURNS, "every turn is free")

        # Then logins right and wrong, as usual.
        checked = await settled(*(sign_in(http, username, p) for p in (PASSWORD, WRONG, PASSWORD)))
        assert server.app.free_database_turns == TURNS
    assert shed.status_code == 503, shed.text
    assert "password hashing" in shed.json()["detail"]
    for response in refused:
        assert response.status_code == 503, response.text
        assert response.json()["detail"] == BUSY
        assert int(response.headers["retry-after"]) > 0
    assert [response.status_code for response in served] == [200, 200]
    assert [response.status_code for response in checked] == [200, 401, 200]


async def test_a_turn_ends_once() -> None:
    turns = asyncio.Semaphore(1)
    turn = DatabaseTurn(turns, 0.1)
    assert await turn.take()
    turn.end()
    turn.end()
    assert await DatabaseTurn(turns, 0.1).take()
    assert not await DatabaseTurn(turns, 0.1).take()  # one turn, given back once


async def test_a_turn_not_back_in_time_is_busy_and_not_held() -> None:
    turns = asyncio.Semaphore(1)
    turn, other = DatabaseTurn(turns, 0.1), DatabaseTurn(turns, 0.1)
    assert await turn.take()
    with pytest.raises(TurnBusy):
        async with turn.released():
            assert await other.take()
    turn.end()  # what the adapter does when the view ends: nothing, it holds no turn
    assert turns.locked()
    other.end()
    assert not turns.locked()


@pytest.mark.parametrize("failure", [ValueError, asyncio.CancelledError])
async def test_a_turn_is_taken_back_after_a_failure_inside(failure: type[BaseException]) -> None:
    turns = asyncio.Semaphore(1)
    turn = DatabaseTurn(turns, 0.1)
    assert await turn.take()
    with pytest.raises(failure):
        async with turn.released():
            assert not turns.locked()
            raise failure
    assert turns.locked()
    turn.end()
    assert not turns.locked()


def hashing_app(inside: Callable[[], Awaitable[None]]) -> Any:
    """A WSGI app that waits, its turn given back, for inside (on the event loop)."""
    loop = WorkerLoop()

    async def wait() -> None:
        async with turn_given_back():
            await inside()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        loop.run(wait())
        start_response("204 No Content", [])
        return []

    return app


async def call(adapter: AsgiAdapter) -> int:
    """One POST through the adapter; its status."""
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "http_version": "1.1"}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await adapter(scope, receive, send)
    return int(sent[0]["status"])


def adapter_of(app: Any) -> AsgiAdapter:
    """An adapter giving app one of TURNS database turns."""
    return AsgiAdapter(
        app, max_body_bytes=1024, needs_database=lambda *_: True, database_slots=TURNS
    )


async def test_a_view_that_raises_frees_its_turn() -> None:
    async def fail() -> None:
        raise ValueError("the hash failed")

    adapter = adapter_of(hashing_app(fail))
    with pytest.raises(ValueError, match="the hash failed"):
        await call(adapter)
    assert adapter.free_database_turns == TURNS


async def test_an_abandoned_request_frees_its_turn_when_its_view_ends() -> None:
    hashing, hashed = asyncio.Event(), asyncio.Event()

    async def hash_slowly() -> None:
        hashing.set()
        await hashed.wait()

    adapter = adapter_of(hashing_app(hash_slowly))
    request = asyncio.create_task(call(adapter))
    await asyncio.wait_for(hashing.wait(), GIVE_UP)
    assert adapter.free_database_turns == TURNS
    request.cancel()
    await asyncio.sleep(0)
    hashed.set()
    await until(lambda: adapter.free_database_turns == TURNS and request.done(), "view ended")
    assert request.cancelled()
    assert await call(adapter) == 204
    assert adapter.free_database_turns == TURNS

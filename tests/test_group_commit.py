"""Concurrent logouts share commits: each still answers only once its revocation is in force."""

from __future__ import annotations

import asyncio

import pytest

from service.config import Settings
from service.store import sessions as session_store
from service.store.group_commit import GroupCommit
from tests.conftest import login, register, serve_in_process


async def test_what_arrives_during_a_commit_goes_into_the_next_one() -> None:
    batches: list[list[int]] = []
    release = asyncio.Event()

    async def commit(items: list[int]) -> None:
        batches.append(items)
        if len(batches) == 1:
            await release.wait()

    group = GroupCommit(commit)
    first = asyncio.ensure_future(group.submit(0))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(group.submit(n)) for n in range(1, 6)]
    await asyncio.sleep(0)
    assert batches == [[0]]  # alone, the first commits at once
    assert not first.done()
    release.set()
    await asyncio.gather(first, *rest)
    assert batches == [[0], [1, 2, 3, 4, 5]]


async def test_a_failed_commit_fails_each_of_its_submitters_and_not_the_next() -> None:
    calls: list[list[str]] = []
    release = asyncio.Event()

    async def commit(items: list[str]) -> None:
        calls.append(items)
        await release.wait()
        if "bad" in items:
            raise ConnectionError("database went away")

    group = GroupCommit(commit)
    first = asyncio.ensure_future(group.submit("first"))
    await asyncio.sleep(0)
    doomed = [asyncio.ensure_future(group.submit(item)) for item in ("bad", "with-bad")]
    await asyncio.sleep(0)
    release.set()
    await first
    for submitted in doomed:
        with pytest.raises(ConnectionError):
            await submitted
    await group.submit("later")
    assert calls == [["first"], ["bad", "with-bad"], ["later"]]


async def test_a_cancelled_submitter_does_not_stop_its_commit() -> None:
    committed: list[list[str]] = []
    started = asyncio.Event()

    async def commit(items: list[str]) -> None:
        started.set()
        await asyncio.sleep(0.05)
        committed.append(items)

    group = GroupCommit(commit)
    submitted = asyncio.ensure_future(group.submit("revocation"))
    await started.wait()
    submitted.cancel()
    with pytest.raises(asyncio.CancelledError):
        await submitted
    await asyncio.sleep(0.1)
    assert committed == [["revocation"]]


async def test_concurrent_logouts_each_end_their_session(settings: Settings) -> None:
    async with serve_in_process(settings) as http:
        password = "correct horse battery"
        username = await register(http, password)
        sessions = [await login(http, username, password) for _ in range(12)]
        logouts = await asyncio.gather(
            *(http.post("/auth/logout", headers=s.bearer()) for s in sessions)
        )
        assert [r.status_code for r in logouts] == [204] * len(sessions)
        for session in sessions:
            refused = await http.get("/api/hello", headers=session.bearer())
            assert refused.status_code == 401
            refresh = await http.post("/auth/refresh", headers=session.bearer(session.refresh))
            assert refresh.status_code == 401


async def test_logouts_after_a_commit_failure_still_work(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_in_process(settings) as http:
        password = "correct horse battery"
        username = await register(http, password)
        first, second = [await login(http, username, password) for _ in range(2)]
        original = session_store.close_sessions

        async def failing(*args: object, **kwargs: object) -> object:
            raise ConnectionResetError("connection to the database lost")

        monkeypatch.setattr(session_store, "close_sessions", failing)
        failed = await http.post("/auth/logout", headers=first.bearer())
        assert failed.status_code == 503, failed.text
        assert failed.headers["content-type"] == "application/problem+json"
        assert (await http.get("/api/hello", headers=first.bearer())).status_code == 200
        monkeypatch.setattr(session_store, "close_sessions", original)
        for session in (first, second):
            answer = await http.post("/auth/logout", headers=session.bearer())
            assert answer.status_code == 204, answer.text
            assert (await http.get("/api/hello", headers=session.bearer())).status_code == 401

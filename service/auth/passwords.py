"""Argon2id password hashing, off the event loop and with a bounded queue.

Hashing is CPU-bound (~17 ms at OWASP parameters). It runs in a small dedicated thread
pool (argon2's C code releases the GIL), so a login storm queues here instead of taking
every core from token checks.

The queue is bounded before a request takes a thread: a request thread waits while its
view hashes, so without a lane of their own, a storm of logins filled every request
thread and everything else queued behind it (a refresh took 15 s behind 300 logins), and
the limit here never tripped (it counted at most REQUEST_THREADS jobs). Views marked
@hashes_password run in the adapter's hashing lane: a few threads of their own, at most
PASSWORD_QUEUE_LIMIT requests per worker running or waiting, 503 past that. The limit
here stays as the bound for callers outside the adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from flask import Flask

from service.adapter import Lane
from service.config import Settings
from service.errors import ServiceUnavailable
from service.isolation import marked_views

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

BUSY = "Too many requests are waiting for password hashing; retry shortly."
# A lane thread spends most of a request waiting for its hash: a couple more than the
# hashing threads keep those busy while others read or write the database.
EXTRA_LANE_THREADS = 2


def hashes_password(view: F) -> F:
    """Mark a view whose POST hashes a password: it runs in the bounded hashing lane."""
    view.hashes_password = True  # type: ignore[attr-defined]
    return view


def hashing_lane(app: Flask, settings: Settings) -> Lane:
    """The adapter's lane for POSTs to views marked @hashes_password."""
    marked = marked_views(app, "hashes_password")
    return Lane(
        selects=lambda method, path: method == "POST" and marked(method, path),
        threads=settings.password_hash_threads + EXTRA_LANE_THREADS,
        limit=settings.password_queue_limit,
        busy_detail=BUSY,
    )


@dataclass(frozen=True, slots=True)
class Verification:
    """Outcome of a password check."""

    ok: bool
    new_hash: str | None = None


class Passwords:
    """Hash and verify passwords with Argon2id in a bounded thread pool."""

    def __init__(self, settings: Settings) -> None:
        self._hasher = PasswordHasher(
            time_cost=settings.password_time_cost,
            memory_cost=settings.password_memory_kib,
            parallelism=settings.password_parallelism,
            type=Type.ID,
        )
        self._threads = settings.password_hash_threads
        self._nice = settings.password_hash_nice
        self._limit = settings.password_queue_limit
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0
        self._lock = threading.Lock()
        self._dummy_hash: str | None = None

    async def _run(self, func: Callable[..., T], *args: object) -> T:
        with self._lock:
            if self._pending >= self._limit:
                raise ServiceUnavailable(BUSY, 2)
            self._pending += 1
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self._threads,
                    thread_name_prefix="argon2",
                    initializer=_lower_priority,
                    initargs=(self._nice,),
                )
            pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, func, *args)
        finally:
            with self._lock:
                self._pending -= 1

    async def hash(self, password: str) -> str:
        """Return an Argon2id hash of password."""
        return await self._run(self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> Verification:
        """Check password; with no hash (unknown user) burn the same time and fail."""
        ok, needs_rehash = await self._run(self._verify_sync, password_hash, password)
        if not ok or password_hash is None:
            return Verification(ok=False)
        new_hash = await self.hash(password) if needs_rehash else None
        return Verification(ok=True, new_hash=new_hash)

    def _verify_sync(self, password_hash: str | None, password: str) -> tuple[bool, bool]:
        try:
            self._hasher.verify(password_hash or self._dummy(), password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False, False
        return password_hash is not None, self._hasher.check_needs_rehash(password_hash or "")

    def _dummy(self) -> str:
        """A hash of a random password, so unknown users cost what known ones do."""
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        return self._dummy_hash

    def shutdown(self) -> None:
        """Stop the hashing threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _lower_priority(nice: int) -> None:
    """Run this hashing thread at a lower CPU priority than the request path.

    Linux schedules threads separately, so a login storm then takes the cores that token
    checks leave idle instead of delaying them.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)

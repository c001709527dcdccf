"""Argon2id password hashing, off the event loop and with a bounded queue.

Hashing is CPU-bound (~17 ms at OWASP parameters). It runs in a small dedicated thread
pool (argon2's C code releases the GIL), so a login storm queues here instead of taking
every core from token checks. Requests wait for their hash on the event loop, suspended
like any other wait, and without their database turn (service/turns.py); at most
PASSWORD_QUEUE_LIMIT hashes per worker run or wait, and a request past that gets 503 with
Retry-After at once.
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
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from service.config import Settings
from service.errors import ServiceUnavailable
from service.turns import turn_given_back

T = TypeVar("T")

BUSY = "Too many requests are waiting for password hashing; retry shortly."


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
        """Run func in the hashing pool, the request's database turn given back meanwhile."""
        pool = self._admit()
        async with turn_given_back():
            try:
                return await asyncio.get_running_loop().run_in_executor(pool, func, *args)
            finally:
                with self._lock:
                    self._pending -= 1

    def _admit(self) -> ThreadPoolExecutor:
        """Count one more hash running or waiting, and return the pool; 503 past the limit."""
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
            return self._pool

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

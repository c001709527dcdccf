"""Password hashing: Argon2id, off the loop, at a lower priority, with a bounded queue."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from service.auth.passwords import Passwords
from service.errors import ServiceUnavailable
from tests.conftest import make_settings


@pytest.fixture
def passwords(tmp_path: Path) -> Passwords:
    """A hasher with the test parameters."""
    return Passwords(make_settings(tmp_path, service_env="development", password_queue_limit=2))


async def test_hash_and_verify(passwords: Passwords) -> None:
    stored = await passwords.hash("a long password")
    assert stored.startswith("$argon2id$")
    assert (await passwords.verify(stored, "a long password")).ok
    assert not (await passwords.verify(stored, "another password")).ok
    assert not (await passwords.verify(None, "a long password")).ok
    passwords.shutdown()


async def test_hashing_threads_run_at_lower_priority(passwords: Passwords) -> None:
    await passwords.hash("a long password")
    hashing = [t for t in threading.enumerate() if t.name.startswith("argon2")]
    assert hashing
    for thread in hashing:
        assert thread.native_id is not None
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) >= 10
    passwords.shutdown()


async def test_queue_overflow_is_a_503(passwords: Passwords) -> None:
    results = await asyncio.gather(
        *(passwords.hash(f"password {i}") for i in range(6)), return_exceptions=True
    )
    assert any(isinstance(r, ServiceUnavailable) for r in results)
    assert any(isinstance(r, str) for r in results)
    passwords.shutdown()

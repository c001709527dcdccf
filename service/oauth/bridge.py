"""Authlib's hooks are synchronous: they reach the async store through the app's loop.

OAuth views are plain (sync) functions running in a request's greenlet on the loop (see
service/loop.py): waiting there on a coroutine suspends only that request, and keeps the
pooled connections of the loop.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from flask import current_app

from service.config import Settings
from service.oauth.keys import Keyring
from service.store import Store

T = TypeVar("T")

TIMEOUT = 30.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run coro on the app's loop and wait for its result, suspended (from a request only)."""
    result: T = current_app.extensions["loop"].run(coro, timeout=TIMEOUT)
    return result


def store() -> Store:
    """The app's store."""
    found: Store = current_app.extensions["store"]
    return found


def settings() -> Settings:
    """The app's settings."""
    found: Settings = current_app.extensions["settings"]
    return found


def keyring() -> Keyring:
    """The app's signing keyring."""
    found: Keyring = current_app.extensions["oauth_keyring"]
    return found

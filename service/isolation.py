"""Which requests may wait on the database, so that the others never queue behind them.

Requests run in a bounded pool of request threads. When PostgreSQL hangs, each request
bound for it holds its thread until its timeouts end it; unchecked, they would take every
thread, and a request that needs no database would wait behind them. So a request that
may reach the database first takes a turn, one of DATABASE_MAX_REQUESTS (fewer than the
threads), waiting for it on the event loop, not in a thread, for at most
DATABASE_POOL_TIMEOUT (then 503). Views that never reach the store say so with
@no_database and never wait for a turn; any other view is taken to need one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

from flask import Flask
from werkzeug.exceptions import HTTPException

F = TypeVar("F", bound=Callable[..., Any])

ROUTE_CACHE_SIZE = 4096


def no_database(view: F) -> F:
    """Mark a view that never reaches the database: it needs no turn."""
    view.no_database = True  # type: ignore[attr-defined]
    return view


def database_policy(app: Flask) -> Callable[[str, str], bool]:
    """Return a (method, path) -> bool test: whether the request needs a database turn."""
    matcher = app.url_map.bind("localhost")

    @lru_cache(maxsize=ROUTE_CACHE_SIZE)
    def needs_database(method: str, path: str) -> bool:
        try:
            endpoint, _ = matcher.match(path, method=method)
        except HTTPException:
            return False  # no view runs: a 404, 405 or redirect
        view = app.view_functions.get(str(endpoint))
        return not getattr(view, "no_database", False)

    return needs_database

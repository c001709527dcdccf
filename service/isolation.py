"""Which requests may wait on the database, so that a hung one cannot pile up the rest.

Requests run on the event loop, each suspended while it waits. When PostgreSQL hangs,
each request bound for it waits until its timeouts end it; unchecked, they would pile up
without bound. So a request that may reach the database first takes a turn, one of
DATABASE_MAX_REQUESTS, waiting for it for at most DATABASE_POOL_TIMEOUT (then 503), and
gives it back while it waits for a password hash (service/turns.py).
Views that never reach the store say so with @no_database and never wait for a turn;
any other view is taken to need one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

from flask import Flask
from werkzeug.exceptions import HTTPException

F = TypeVar("F", bound=Callable[..., Any])

ROUTE_CACHE_SIZE = 4096
ROUTE_CACHE_LONGEST = 256  # longer paths are matched each time: the memo stays under 4 MiB


def no_database(view: F) -> F:
    """Mark a view that never reaches the database: it needs no turn."""
    view.no_database = True  # type: ignore[attr-defined]
    return view


def database_policy(app: Flask) -> Callable[[str, str], bool]:
    """Return a (method, path) -> bool test: whether the request needs a database turn."""
    spared = marked_views(app, "no_database")
    routed = marked_views(app, None)
    return lambda method, path: routed(method, path) and not spared(method, path)


def marked_views(app: Flask, mark: str | None) -> Callable[[str, str], bool]:
    """Return a (method, path) -> bool test for views carrying the attribute mark.

    With mark None: whether any view answers (not a 404, 405 or redirect).
    """
    matcher = app.url_map.bind("localhost")

    def is_marked(method: str, path: str) -> bool:
        if len(path) > ROUTE_CACHE_LONGEST:
            return matches(method, path)
        return remembered(method, path)

    def matches(method: str, path: str) -> bool:
        try:
            endpoint, _ = matcher.match(path, method=method)
        except HTTPException:
            return False
        view = app.view_functions.get(str(endpoint))
        return view is not None and (mark is None or bool(getattr(view, mark, False)))

    remembered = lru_cache(maxsize=ROUTE_CACHE_SIZE)(matches)
    return is_marked

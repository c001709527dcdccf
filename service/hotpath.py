"""Which requests run on the server's event loop itself instead of a request thread.

Handing a request to a thread and back costs more than a token check (measured: +40%
throughput and a third of the p99 when /api/hello runs inline). Views marked with
@runs_inline qualify: synchronous, CPU-light, and waiting for nothing. Besides them, a
client_credentials token request runs there once its client is fetched (oauth/prefetch.py).
Whatever would have to wait there (a token whose verdict is not kept in memory) raises
WouldBlock before doing anything, and the request runs again in a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from service.adapter import RUN_IN_THREAD
from service.loop import WouldBlock

F = TypeVar("F", bound=Callable[..., Any])

ROUTE_CACHE_SIZE = 4096
ROUTE_CACHE_LONGEST = 256  # longer paths are matched each time: the memo stays under 4 MiB


def runs_inline(view: F) -> F:
    """Mark a synchronous, non-blocking view as safe to run on the event loop."""
    view.runs_inline = True  # type: ignore[attr-defined]
    return view


def init_app(app: Flask) -> None:
    """Send a request that would wait on the event loop back to the adapter, for a thread."""
    app.register_error_handler(WouldBlock, _run_in_thread)


def _run_in_thread(_error: WouldBlock) -> Response:
    request.environ[RUN_IN_THREAD] = True
    return Response(status=503)  # never sent: the adapter runs the request again


def inline_policy(app: Flask) -> Callable[[str, str], bool]:
    """Return a (method, path) -> bool test for views marked with @runs_inline."""
    return marked_views(app, "runs_inline")


def marked_views(app: Flask, mark: str) -> Callable[[str, str], bool]:
    """Return a (method, path) -> bool test for views carrying the attribute mark."""
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
        return bool(getattr(view, mark, False))

    remembered = lru_cache(maxsize=ROUTE_CACHE_SIZE)(matches)
    return is_marked

"""Around every request the app answers: its id, its access-log line and its metrics.

A request id comes from X-Request-ID when it is a plausible one (at most 128 of
`A-Za-z0-9._:-`), else is made here, and is on every log line of the request. The
response's X-Request-ID gives it back when the client sent one, and on every error
(status 400 and up), where someone may need to quote it; a successful answer to a
request that named none goes without: a value new on every response would cost an
HTTP/2 response about a tenth more (h2's header checks and HPACK's table and Huffman
coding see a new header each time; measured in docs/performance.md).

The access-log line names the method, the url rule (never the raw path, so never a query
string), the status, the duration, the request id and the client's address; never a
header. Answers the adapter gives before the app runs (413, 408, and 503 when no database
turn is free) get the same, under the route `unmatched` (server_answers).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Request
from werkzeug.routing import Rule

from service import logs, metrics
from service.addresses import client_address
from service.logs import REQUEST_ID

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

HEADER = "X-Request-ID"
ROUTE = "service.route"  # the environ key where the url rule Flask matched is noted
PLAUSIBLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(given: str | None) -> str:
    """The client's id when it is plausible, else a new random one."""
    if given is not None and PLAUSIBLE_ID.fullmatch(given):
        return given
    return os.urandom(16).hex()


def echoed(given: str | None, rid: str, status: int) -> bool:
    """Whether the response names the request id: the client's own, or on an error."""
    return rid == given or status >= 400


def server_answers(*, access_log: bool) -> Callable[[dict[str, Any], int, float], str]:
    """What the adapter tells of an answer it gives without the app; returns its request id."""

    def observe(scope: dict[str, Any], status: int, seconds: float) -> str:
        given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        rid = request_id(None if given is None else given.decode("latin-1"))
        method = scope["method"]
        metrics.request_answered(metrics.UNMATCHED, method, status, seconds)
        if access_log:
            client = scope.get("client") or ("", 0)
            logs.access(method, metrics.UNMATCHED, status, seconds, rid, str(client[0]))
        return rid

    return observe


def init_app(app: Flask, *, access_log: bool) -> None:
    """Observe every request the app answers, outermost, so the id is set before all else."""
    app.wsgi_app = RequestObserver(  # type: ignore[method-assign]
        app.wsgi_app, access_log=access_log
    )


class RouteNotingRequest(Request):
    """Flask's request, leaving the url rule it matched where RequestObserver reads it.

    Flask sets url_rule once, when it matches the path, and drops the request before the
    middleware sees the response; an after_request hook would cost every request a call
    through Flask's hook machinery instead of one assignment.
    """

    _rule: Rule | None = None

    @property
    def url_rule(self) -> Rule | None:
        """The rule Flask matched, if any."""
        return self._rule

    @url_rule.setter
    def url_rule(self, rule: Rule | None) -> None:
        self._rule = rule
        if rule is not None:
            self.environ[ROUTE] = rule.rule


class RequestObserver:
    """WSGI middleware: request id, duration, request metrics and the access log."""

    def __init__(self, app: WsgiApp, *, access_log: bool) -> None:
        self._app = app
        self._access_log = access_log

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        started = time.perf_counter()
        given = environ.get("HTTP_X_REQUEST_ID")
        rid = request_id(given)
        status = 500  # what the server answers if the app raises past its handlers

        def respond(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal status
            status = int(line[:3])
            if echoed(given, rid, status):
                headers.append((HEADER, rid))
            return start_response(line, headers, exc_info)

        token = REQUEST_ID.set(rid)
        try:
            return self._app(environ, respond)
        finally:
            seconds = time.perf_counter() - started
            route = environ.get(ROUTE, metrics.UNMATCHED)
            method = environ["REQUEST_METHOD"]
            metrics.request_answered(route, method, status, seconds)
            if self._access_log:
                logs.access(method, route, status, seconds, rid, client_address(environ))
            REQUEST_ID.reset(token)

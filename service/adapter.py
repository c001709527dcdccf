"""Serve the Flask (WSGI) app over ASGI, on the server's event loop.

Each request runs in a greenlet on the loop (service/loop.py): where the app waits for
PostgreSQL or Redis, the greenlet is suspended and the loop serves other requests.
Written for this service instead of Hypercorn's WSGI mode, which runs every request in a
fixed thread pool, sends no response for empty bodies (204, HEAD), and ignores lifespan
shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_to_bytes

from service.loop import run_suspendable
from service.turns import BUSY as BUSY_DETAIL
from service.turns import DATABASE_TURN, RETRY_AFTER, DatabaseTurn, Turns

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# Told of each answer given without the app (408, 413, 503): scope, status, seconds; it
# returns the request id the answer names.
Observe = Callable[[Scope, int, float], str]

DRAIN_SECONDS = 10.0
PATH_CACHE_SIZE = 1024  # distinct raw paths whose decoding is remembered
PATH_CACHE_LONGEST = 256  # longer paths are decoded each time: the memo stays under 1 MiB
TOO_LARGE = (
    b'{"type":"about:blank","title":"Content Too Large","status":413,'
    b'"detail":"The request body is too large."}'
)
TOO_SLOW = (
    b'{"type":"about:blank","title":"Request Timeout","status":408,'
    b'"detail":"The request body did not arrive in time."}'
)
BUSY = (
    b'{"type":"about:blank","title":"Service Unavailable","status":503,'
    b'"detail":"' + BUSY_DETAIL.encode() + b'"}'
)
RETRY_AFTER_BYTES = str(RETRY_AFTER).encode()
PROBLEM = [(b"content-type", b"application/problem+json")]
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


class AsgiAdapter:
    """An ASGI 3 application wrapping a WSGI application.

    Requests run on the event loop, suspended wherever the app waits (run_suspendable).
    A request `needs_database` selects first waits for one of `database_slots` turns (see
    service/isolation.py), which its view may give back for a while (service/turns.py).
    """

    def __init__(
        self,
        wsgi_app: WsgiApp,
        *,
        max_body_bytes: int,
        body_timeout: float = 60.0,
        on_startup: Callable[[], Awaitable[None]] | None = None,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
        needs_database: Callable[[str, str], bool] | None = None,
        database_slots: int = 1,
        database_wait: float = 2.0,
        observe: Observe | None = None,
    ) -> None:
        self._wsgi_app = wsgi_app
        self._max_body = max_body_bytes
        self._body_timeout = body_timeout
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown
        self._needs_database = needs_database
        self._database_turns = Turns(database_slots)
        self._database_wait = database_wait
        self._observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Warm the app up (pools, blocklist) on this loop, before it takes requests."""
        if self._on_startup is not None:
            await self._on_startup()
        # What start-up built (modules, the app, pools) lives as long as the process: left
        # to the collector, every full collection walked all of it, a 100-150 ms pause of
        # the event loop that showed as the protected GET's p99 once traffic triggered one.
        gc.collect()
        gc.freeze()

    async def shutdown(self) -> None:
        """Close the app's connections."""
        if self._on_shutdown is not None:
            try:
                await self._on_shutdown()
            except Exception:
                log.exception("error during shutdown")

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        try:
            body = await self._read_body(receive)
        except TimeoutError:
            headers = [*PROBLEM, (b"connection", b"close")]
            await self._refuse(send, scope, started, 408, headers, TOO_SLOW)
            return
        if body is None:
            await self._refuse(send, scope, started, 413, PROBLEM, TOO_LARGE)
            return
        environ = build_environ(scope, body)
        if self._needs_database is not None and self._needs_database(
            scope["method"], environ["PATH_INFO"]
        ):
            answer = await self._call_in_turn(environ)
            if answer is None:
                headers = [*PROBLEM, (b"retry-after", RETRY_AFTER_BYTES)]
                await self._refuse(send, scope, started, 503, headers, BUSY)
                return
            status, headers, chunks = answer
        else:
            status, headers, chunks = await self._call_on_loop(environ)
        await _respond(send, status, headers, chunks)

    async def _refuse(
        self,
        send: Send,
        scope: Scope,
        started: float,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        """Answer without the app, observed as its answers are (request id, metrics, log)."""
        if self._observe is not None:
            rid = self._observe(scope, status, time.perf_counter() - started)
            headers = [*headers, (b"x-request-id", rid.encode("latin-1"))]
        await _respond(send, status, headers, body)

    @property
    def free_database_turns(self) -> int:
        """How many database turns no request holds now."""
        return self._database_turns.free

    async def _call_in_turn(self, environ: dict[str, Any]) -> Answer | None:
        """Run the app once a database turn is free; None if none came in time."""
        turn = DatabaseTurn(self._database_turns, self._database_wait)
        if not await turn.take():
            return None
        try:
            task = asyncio.ensure_future(run_suspendable(lambda: self._call_holding(turn, environ)))
        except BaseException:
            turn.end()
            raise
        # The turn ends with the view's work, even if this request is cancelled meanwhile.
        task.add_done_callback(lambda _: turn.end())
        return await asyncio.shield(task)

    def _call_holding(self, turn: DatabaseTurn, environ: dict[str, Any]) -> Answer:
        """Run the app with turn as the request's database turn."""
        token = DATABASE_TURN.set(turn)
        try:
            return self._call(environ)
        finally:
            DATABASE_TURN.reset(token)

    async def _call_on_loop(self, environ: dict[str, Any]) -> Answer:
        """Run the app on this loop, to the end even if the request is cancelled meanwhile."""
        return await run_suspendable(lambda: self._call(environ))

    async def _read_body(self, receive: Receive) -> bytes | None:
        """Read the whole body; None once it exceeds the limit, TimeoutError if it stalls.

        Hypercorn's read_timeout is left unset (it wraps every socket read in a task of its
        own); a stalled body is timed out here instead, and stalled headers by Hypercorn's
        keep-alive timeout, as the connection still counts as idle.
        """
        message = await receive()
        if not message.get("more_body", False) and message["type"] != "http.disconnect":
            body: bytes = message.get("body", b"")
            return body if len(body) <= self._max_body else None
        async with asyncio.timeout(self._body_timeout):
            return await self._read_rest(receive, message)

    async def _read_rest(self, receive: Receive, message: Message) -> bytes | None:
        parts: list[bytes] = []
        size = 0
        while True:
            if message["type"] == "http.disconnect":
                return b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                if message.get("more_body", False):
                    # Answering while the client still sends makes Hypercorn's HTTP/2
                    # protocol fail on DATA for a finished stream and drop the whole
                    # connection: drain it first.
                    await _drain(receive)
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)
            message = await receive()

    def _call(self, environ: dict[str, Any]) -> Answer:
        """Run the WSGI app to completion (in run_suspendable, on the loop)."""
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return lambda _data: None

        result = self._wsgi_app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started
        encoded = [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers
        ]
        return int(status.split(" ", 1)[0]), encoded, body


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
        loop.call_soon_threadsafe(callback)


async def _drain(receive: Receive, limit: float = DRAIN_SECONDS) -> None:
    """Discard the rest of a request body, for at most limit seconds."""

    async def discard() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(discard(), limit)


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except (OSError, RuntimeError):
        log.debug("client went away before the response was sent")


def build_environ(scope: Scope, body: bytes) -> dict[str, Any]:
    """Translate an ASGI HTTP scope into a PEP 3333 environ."""
    server = scope.get("server") or ("localhost", 443)
    client = scope.get("client") or ("", 0)
    raw_path = scope.get("raw_path")
    path = raw_path.split(b"?", 1)[0].decode("latin-1") if raw_path else scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": root,
        "PATH_INFO": unquote_path(path),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": str(client[0]),
        "REMOTE_PORT": str(client[1]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input_terminated": True,
    }
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        if name == "CONTENT_TYPE":
            environ["CONTENT_TYPE"] = value
            continue
        if name in {"CONTENT_LENGTH", "TRANSFER_ENCODING"}:
            continue  # the body is already read whole: its length is CONTENT_LENGTH
        key = f"HTTP_{name}"
        if key in environ:
            separator = "; " if key == "HTTP_COOKIE" else ","
            environ[key] = f"{environ[key]}{separator}{value}"
        else:
            environ[key] = value
    if "HTTP_HOST" not in environ and "HTTP_:AUTHORITY" in environ:
        environ["HTTP_HOST"] = environ.pop("HTTP_:AUTHORITY")
    return environ


def unquote_path(path: str) -> str:
    """Percent-decode a raw path to the latin-1 string PEP 3333 expects."""
    if len(path) > PATH_CACHE_LONGEST:
        return unquote_to_bytes(path).decode("latin-1")
    return unquote_short_path(path)


@lru_cache(maxsize=PATH_CACHE_SIZE)
def unquote_short_path(path: str) -> str:
    """unquote_path for a path short enough to remember (PATH_CACHE_LONGEST)."""
    return unquote_to_bytes(path).decode("latin-1")

"""New connections from penalised addresses reset at accept, before their TLS handshake.

Hypercorn 0.18 serves each listening socket with asyncio.start_server(sock=...), that is
the event loop's create_server. Under uvloop (hypercorn.toml's worker_class) libuv
accepts on the socket's file descriptor and uvloop's own TLS protocol starts the
handshake before any Python code sees the peer: neither the socket object nor the
protocol factory can refuse a connection before TLS. The event loop can. A worker
therefore runs Hypercorn's `worker_serve` itself, as Hypercorn's `uvloop_worker` and
`asyncio_worker` do, on a loop whose create_server accepts in Python: a connection from
an address in the penalty box (penalty_box.py) is reset (SO_LINGER 0: the client learns
at once and the worker keeps no TIME_WAIT), every other one goes to the loop's own
connect_accepted_socket, the same transport and TLS protocol as the loop's own server.

The worker runs on this loop with the penalty box off too (the loop's own server accepts
then): its TLS connections are tracked, so that a stop need not wait for peers that never
answer the close (service/stopping.py).

`shapes_differ` checks at start-up that Hypercorn's worker is still what this replaces;
if not, one warning is logged and Hypercorn's own worker runs, without the penalty box and
waiting at a stop for every TLS peer's answer. See docs/performance.md, "Library changes".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from service.stopping import Connections
from service.transport import penalty_box

log = logging.getLogger(__name__)

RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_RETRY_DELAY = 1.0  # seconds without accepting after running out of descriptors
# create_server's options the gate serves as the loop would; any other goes to the loop.
GATED_OPTIONS = {"sock", "backlog", "ssl", "ssl_handshake_timeout", "ssl_shutdown_timeout"}


class GatedServer:
    """A listening socket, accepted in Python: penalised peers reset, the rest served."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        sock: socket.socket,
        backlog: int = 100,
        **tls: Any,
    ) -> None:
        self._loop = loop
        self._factory = protocol_factory
        self._sock = sock
        self._backlog = backlog
        self._tls = {name: value for name, value in tls.items() if value is not None}
        self._handshakes: set[asyncio.Task[None]] = set()
        self._serving = True
        sock.setblocking(False)
        sock.listen(backlog)
        loop.add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening socket, while serving."""
        return (self._sock,) if self._serving else ()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The loop serving the socket."""
        return self._loop

    def is_serving(self) -> bool:
        """Whether new connections are accepted."""
        return self._serving

    def close(self) -> None:
        """Stop accepting and close the listening socket; connections go on."""
        if self._serving:
            self._serving = False
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()

    async def wait_closed(self) -> None:
        """Nothing to wait for once closed (as Python 3.11's and uvloop's servers return)."""

    def _accept(self) -> None:
        """Accept what is pending (at most backlog at once), as the loop's own server does."""
        for _ in range(self._backlog):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES:
                    raise  # the loop logs it
                self._pause(exc)
                return
            if not penalty_box.BOX.admits(peer):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                conn.close()
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._serve(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _serve(self, conn: socket.socket) -> None:
        """Hand an admitted connection to the loop (its TLS handshake included)."""
        # A failed or timed-out handshake raises OSError; the loop has closed the connection.
        with contextlib.suppress(OSError):
            await self._loop.connect_accepted_socket(self._factory, conn, **self._tls)

    def _pause(self, exc: OSError) -> None:
        """Out of descriptors: stop accepting for a while, as asyncio's own server does."""
        self._loop.call_exception_handler(
            {"message": "socket.accept() out of system resource", "exception": exc}
        )
        self._loop.remove_reader(self._sock.fileno())
        self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        if self._serving:
            self._loop.add_reader(self._sock.fileno(), self._accept)


async def create_server(
    loop: asyncio.AbstractEventLoop,
    original: Callable[..., Any],
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: Any = None,
    port: Any = None,
    *,
    gate: bool = True,
    connections: Connections | None = None,
    **options: Any,
) -> Any:
    """The loop's create_server; a TCP socket Hypercorn hands over is served through the gate.

    Without gate, every socket goes to the loop. With connections, TLS connections are
    tracked there, for the stop.
    """
    if connections is not None and options.get("ssl") is not None:
        protocol_factory = connections.track(protocol_factory)
    sock = options.get("sock")
    if (
        gate
        and host is None
        and port is None
        and isinstance(sock, socket.socket)
        and sock.type == socket.SOCK_STREAM
        and sock.family in (socket.AF_INET, socket.AF_INET6)
        and options.keys() <= GATED_OPTIONS
    ):
        return GatedServer(loop, protocol_factory, **options)
    return await original(protocol_factory, host, port, **options)


def loop_factory(
    worker_class: str, *, gate: bool = True, connections: Connections | None = None
) -> Callable[[], asyncio.AbstractEventLoop]:
    """A new-loop function for worker_class whose create_server is the gate's."""
    serve = functools.partial(create_server, gate=gate, connections=connections)
    if worker_class == "uvloop":
        import uvloop

        class GatedUvloop(uvloop.Loop):
            """uvloop, with the gate's create_server."""

            async def create_server(self, *args: Any, **kwargs: Any) -> Any:
                return await serve(self, super().create_server, *args, **kwargs)

        return GatedUvloop

    class GatedLoop(asyncio.SelectorEventLoop):
        """asyncio's loop, with the gate's create_server."""

        async def create_server(self, *args: Any, **kwargs: Any) -> Any:
            return await serve(self, super().create_server, *args, **kwargs)

    return GatedLoop


def quiet_tls_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Hypercorn's loop exception handler: failed handshakes are not worth a log line."""
    if not isinstance(context.get("exception"), ssl.SSLError):
        loop.default_exception_handler(context)


def shapes_differ(worker_class: str) -> list[str]:
    """What of Hypercorn's worker the gate replaces is not as it expects."""
    from hypercorn import utils
    from hypercorn.asyncio import run

    stock = run.uvloop_worker if worker_class == "uvloop" else run.asyncio_worker
    expected: list[tuple[str, Callable[..., Any], list[str], set[str]]] = [
        (
            stock.__name__,
            stock,
            ["config", "sockets", "shutdown_event"],
            {"load_application", "check_multiprocess_shutdown_event", "worker_serve", "_run"},
        ),
        ("_run", run._run, ["main", "debug", "shutdown_trigger", "loop_factory"], {"Runner"}),
        (
            "worker_serve",
            run.worker_serve,
            ["app", "config", "sockets", "shutdown_trigger"],
            {"start_server"},
        ),
        ("load_application", utils.load_application, ["path", "wsgi_max_body_size"], set()),
        (
            "check_multiprocess_shutdown_event",
            utils.check_multiprocess_shutdown_event,
            ["shutdown_event", "sleep"],
            set(),
        ),
        ("asyncio.start_server", asyncio.start_server, [], {"create_server"}),
    ]
    differ = []
    for name, function, parameters, names in expected:
        code = getattr(function, "__code__", None)
        found = list(inspect.signature(function).parameters)
        if code is None or (parameters and found != parameters):
            differ.append(f"{name}: parameters")
        elif not names <= set(code.co_names):
            differ.append(f"{name}: uses {sorted(names - set(code.co_names))}")
    return differ


def run_worker(config: Any, sockets: Any, shutdown_event: Any) -> None:
    """Run one Hypercorn worker on the gate's loop (gating only with a penalty policy)."""
    from hypercorn.asyncio import run
    from hypercorn.utils import check_multiprocess_shutdown_event, load_application

    stock = run.uvloop_worker if config.worker_class == "uvloop" else run.asyncio_worker
    policy = getattr(config, "penalty_policy", None)
    differ = shapes_differ(config.worker_class)
    if differ:
        lost = ["a stop waits for every TLS peer to answer its close (up to 30 s)"]
        if policy is not None:
            lost.insert(0, "HTTP/2 abuse penalty box NOT installed")
        log.warning(
            "Hypercorn's worker differs (%s; hypercorn %s): its own worker runs; %s",
            "; ".join(differ),
            version("hypercorn"),
            "; ".join(lost),
        )
        stock(config=config, sockets=sockets, shutdown_event=shutdown_event)
        return
    penalty_box.BOX.configure(policy)
    connections = Connections()
    app = load_application(config.application_path, config.wsgi_max_body_size)

    async def trigger() -> None:
        """Hypercorn's wait for the shutdown event; then the stop's handling of connections."""
        await check_multiprocess_shutdown_event(shutdown_event, asyncio.sleep)
        connections.stopping()

    new_loop = loop_factory(config.worker_class, gate=policy is not None, connections=connections)
    with asyncio.Runner(debug=config.debug, loop_factory=new_loop) as runner:
        runner.get_loop().set_exception_handler(quiet_tls_errors)
        runner.run(run.worker_serve(app, config, sockets=sockets, shutdown_trigger=trigger))

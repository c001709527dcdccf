"""Listening addresses: refuse one that another process already listens on.

With more than one worker, Hypercorn binds with SO_REUSEPORT, and so would a second
instance started on the same address: the kernel would then split new connections
between the two without a word. A probe bound without SO_REUSEPORT fails with
EADDRINUSE while anyone listens there, with SO_REUSEPORT or without.
"""

from __future__ import annotations

import errno
import socket
from typing import Any


class BindError(Exception):
    """An address the service cannot listen on; the message is one line for the log."""


def check_binds(config: Any) -> None:
    """Raise BindError for the first of config's addresses this process cannot listen on."""
    if not config.ssl_enabled:
        binds = [(bind, socket.SOCK_STREAM) for bind in config.bind]
    else:
        binds = [(bind, socket.SOCK_STREAM) for bind in [*config.bind, *config.insecure_bind]]
        binds += [(bind, socket.SOCK_DGRAM) for bind in config.quic_bind]
    for bind, kind in binds:
        if not bind.startswith(("unix:", "fd://")):
            _probe(bind, kind)


def _probe(bind: str, kind: int) -> None:
    """Bind (and release) the address as Hypercorn would, but without SO_REUSEPORT."""
    host, port = host_port(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, kind) as probe:
            if kind == socket.SOCK_STREAM:
                # As in Hypercorn: connections of an earlier run in TIME_WAIT do not count.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        taken = exc.errno == errno.EADDRINUSE
        reason = "another process is listening there" if taken else exc.strerror or str(exc)
        raise BindError(f"cannot listen on {bind}: {reason}") from None


def host_port(bind: str) -> tuple[str, int]:
    """Split host:port ([v6]:port) as Hypercorn does, port 8000 when none is given."""
    bind = bind.replace("[", "").replace("]", "")
    host, _, port = bind.rpartition(":")
    try:
        return host, int(port)
    except ValueError:
        return bind, 8000

"""An HTTP/2 connection's budgets of frames that make the server work and give a client nothing.

Each connection has a token bucket per kind of frame (BUDGETS); a frame taken from an
empty one raises h2's DenialOfServiceError, which h2 answers with GOAWAY
ENHANCE_YOUR_CALM, and the client's address goes to the penalty box (penalty_box.py).
The guard also keeps what the connection's streams are doing that the
libraries do not track: which applications still run after their stream was reset.
Installed by service/transport/h2_guard.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import h2.events
import h2.exceptions
from hyperframe.frame import (
    ExtensionFrame,
    Frame,
    GoAwayFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from service.transport import penalty_box

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Budget:
    """A token bucket: `burst` frames at once, refilled at `per_second`."""

    burst: float
    per_second: float


# A browser or API client sends a handful of each per connection; floods send thousands a
# second. nghttp2 allows 1,000 resets at 33/s, Netty 200 per 30 s; h2 spends 10-100 us of
# this worker's time on each of these frames, so a budget is also the most one attacking
# connection costs before it is closed (a few ms).
BUDGETS = {
    "SETTINGS": Budget(burst=50, per_second=5),
    "PING": Budget(burst=50, per_second=5),
    "RST_STREAM": Budget(burst=100, per_second=10),  # client resets and refused streams
    "PRIORITY": Budget(burst=100, per_second=10),
    "empty": Budget(burst=100, per_second=10),  # empty DATA, WINDOW_UPDATE, unknown types
}
# Each stream a client opens earns it a few more frames that go with requests: a client
# may return flow-control credit for every response it reads (stream and connection).
# Such credit is kept for at most CREDIT_STREAMS streams beyond the burst.
STREAM_CREDIT = {"empty": 4, "PRIORITY": 2}
CREDIT_STREAMS = 256
FRAME_KINDS: dict[type[Frame], tuple[str, str]] = {  # frame type: its budget, its name
    SettingsFrame: ("SETTINGS", "SETTINGS"),
    PingFrame: ("PING", "PING"),
    RstStreamFrame: ("RST_STREAM", "RST_STREAM"),
    PriorityFrame: ("PRIORITY", "PRIORITY"),
    WindowUpdateFrame: ("empty", "WINDOW_UPDATE"),
    ExtensionFrame: ("empty", "unknown-type"),
    GoAwayFrame: ("empty", "GOAWAY"),
}
EMPTY_DATA = ("empty", "empty DATA")
# A stream reset in the read that opened it (CVE-2023-44487's pattern; a browser cancels
# a handful at most) costs this many resets: each costs h2 its HEADERS, 100 us.
RAPID_RESET_COST = 4
REFUSED = ("RST_STREAM", "refused-stream HEADERS")
# After GOAWAY, the connection is cut (not closed politely: a TLS close waits for the
# client's close_notify, decrypting whatever else it sends) once GOAWAY has had this long.
ABORT_AFTER = 1.0
LOG_INTERVAL = 1.0  # seconds between two log lines about one frame's floods, per worker


class ConnectionGuard:
    """One connection's budgets, and its streams whose application is still running."""

    __slots__ = (
        "breach",
        "buckets",
        "fresh",
        "orphans",
        "peer",
        "resets_seen",
        "running",
        "transport",
    )

    def __init__(self, peer: Any, transport: Any = None) -> None:
        now = time.monotonic()
        self.peer = peer
        self.transport = transport
        self.buckets = {kind: [budget.burst, now] for kind, budget in BUDGETS.items()}
        self.running: set[int] = set()  # streams whose application has not returned
        self.orphans: set[int] = set()  # ... among them, those the client has reset
        self.resets_seen = False  # since the last batch of events was screened
        self.fresh: set[int] = set()  # streams opened since then
        self.breach: str | None = None

    def spend(self, kind: tuple[str, str], cost: int = 1) -> None:
        """Take a frame from its budget; DenialOfServiceError once that is spent."""
        budget, bucket = BUDGETS[kind[0]], self.buckets[kind[0]]
        now = time.monotonic()
        if bucket[0] < budget.burst:  # time refills up to the burst; credit may go beyond
            bucket[0] = min(budget.burst, bucket[0] + (now - bucket[1]) * budget.per_second)
        bucket[0] -= cost
        bucket[1] = now
        if bucket[0] < 0:
            if self.breach is None:
                self.breach = kind[1]
                _log_breach(self.peer, kind[1], penalty_box.BOX.penalise(self.peer))
                if self.transport is not None:
                    asyncio.get_running_loop().call_later(ABORT_AFTER, self.transport.abort)
            raise h2.exceptions.DenialOfServiceError(f"too many {kind[1]} frames")

    def credit(self) -> None:
        """A stream opened: add its share to the budgets of frames that go with requests."""
        for kind, tokens in STREAM_CREDIT.items():
            bucket = self.buckets[kind]
            bucket[0] = min(BUDGETS[kind].burst + tokens * CREDIT_STREAMS, bucket[0] + tokens)

    def screen(self, protocol: Any, events: list[h2.events.Event]) -> list[h2.events.Event]:
        """The events Hypercorn should see: none for streams it need not start or no longer has."""
        self.fresh.clear()
        reset = set()
        if self.resets_seen:
            self.resets_seen = False
            reset = {e.stream_id for e in events if isinstance(e, h2.events.StreamReset)}
        kept, opened, skipped = [], set(), set()
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                if event.stream_id in reset:  # opened and cancelled at once: never started
                    skipped.add(event.stream_id)
                    continue
                opened.add(event.stream_id)
            elif isinstance(event, h2.events.DataReceived | h2.events.StreamEnded):
                stream_id = event.stream_id
                if stream_id in skipped or (
                    stream_id not in protocol.streams and stream_id not in opened
                ):
                    if isinstance(event, h2.events.DataReceived):  # Hypercorn would KeyError
                        protocol.connection.acknowledge_received_data(
                            event.flow_controlled_length, stream_id
                        )
                    continue
            kept.append(event)
        return kept


_last_logged: dict[str, tuple[float, int]] = {}  # name: (when, connections closed since)


def _log_breach(peer: Any, kind: str, penalty: float | None) -> None:
    """One line per closed connection, at most one per frame and LOG_INTERVAL (with a count)."""
    now = time.monotonic()
    at, unlogged = _last_logged.get(kind, (-LOG_INTERVAL, 0))
    if now - at < LOG_INTERVAL:
        _last_logged[kind] = (at, unlogged + 1)
        return
    _last_logged[kind] = (now, 0)
    host = peer[0] if isinstance(peer, tuple) and peer else "unknown"
    more = f" (and {unlogged} more since the last such line)" if unlogged else ""
    boxed = f"; its new connections refused for {penalty:.1f} s" if penalty else ""
    log.warning(
        "HTTP/2 client %s sent too many %s frames: GOAWAY ENHANCE_YOUR_CALM, connection closed%s%s",
        host,
        kind,
        boxed,
        more,
    )

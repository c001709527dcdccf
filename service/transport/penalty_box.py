"""Addresses whose HTTP/2 connections were cut for abuse, refused new connections for a while.

The guard (h2_budgets.py) ends an abusive connection within a few ms, but its client
reconnects at once, and every new connection costs the worker a TLS handshake and the
connection's set-up before it can be cut again (about 600 a second from a handful of
attackers). As HAProxy's stick tables, Envoy's overload actions or fail2ban do, the
address whose connection was cut is now penalised: for `first` seconds, doubled for each
further offence up to `cap`, one doubling forgiven for every `cap` seconds without one.
New connections from a penalised address are reset at accept, before the TLS handshake
(accept_gate.py), and counted.

Per worker process; addresses grouped as the failure counters group them (an IPv4
address, an IPv6 /64); kept in a memo bounded in bytes (memo.py), oldest offence first out.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any

from service.addresses import MAX_UNPARSED, address_group
from service.transport.memo import ENTRY_OVERHEAD, BoundedMemo

log = logging.getLogger(__name__)

# An offender's object and its numbers. An entry is charged this, its key and ENTRY_OVERHEAD
# (about 460 bytes); tracemalloc measured about 300 per entry, key and memo slot included.
OFFENDER_BYTES = 192
# The longest key: an unparsed address is cut to MAX_UNPARSED, an IPv6 /64 is shorter.
ENTRY_BYTES = ENTRY_OVERHEAD + OFFENDER_BYTES + MAX_UNPARSED
LOG_INTERVAL = 1.0  # seconds between two lines about refused connections, per worker


@dataclass(frozen=True, slots=True)
class Policy:
    """How long an address is penalised, and how many addresses a worker remembers."""

    first: float  # seconds, for a first offence
    cap: float  # seconds at most; also the time without offence that forgives a doubling
    addresses: int
    # Never penalised: a trusted proxy carries every client's connections.
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


class Offender:
    """One address's offences: doublings not yet forgiven, its penalty's end, refusals."""

    __slots__ = ("doublings", "refused", "until")

    def __init__(self) -> None:
        self.doublings = 0
        self.until = 0.0
        self.refused = 0


class PenaltyBox:
    """The addresses one worker refuses at accept; off until configured."""

    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.offenders: BoundedMemo[Offender] = BoundedMemo(budget=0, entry_limit=0)
        self.latest = 0.0  # no address is penalised after this (monotonic seconds)
        self.refused = 0  # connections refused, in all
        self._logged_at = -LOG_INTERVAL
        self._unlogged = 0

    def configure(self, policy: Policy | None) -> None:
        """Penalise under policy from now on (None: never), forgetting every offence."""
        self.policy = policy
        entries = policy.addresses if policy is not None else 0
        self.offenders = BoundedMemo(budget=entries * ENTRY_BYTES, entry_limit=ENTRY_BYTES)
        self.latest = 0.0
        self.refused = 0

    def penalise(self, peer: Any) -> float | None:
        """Penalise peer's address for an abusive connection; seconds it stays refused, or None.

        A connection cut while its address is already penalised (one opened before the
        penalty) adds nothing: one offence per penalty.
        """
        policy = self.policy
        host = _host(peer)
        if policy is None or host is None or _exempt(host, policy):
            return None
        key = address_group(host)
        now = time.monotonic()
        offender = self.offenders.get(key)
        if offender is None:
            offender = Offender()
        elif now < offender.until:
            return offender.until - now
        forgiven = int((now - offender.until) // policy.cap)
        doublings = max(0, offender.doublings - forgiven)
        seconds = min(policy.cap, policy.first * 2.0**doublings)
        offender.doublings = min(doublings + 1, 64)
        offender.until = now + seconds
        offender.refused = 0
        self.offenders.put(key, offender, OFFENDER_BYTES + len(key))
        self.latest = max(self.latest, offender.until)
        return seconds

    def admits(self, peer: Any) -> bool:
        """Whether a new connection from peer may proceed; a refusal is counted and logged."""
        if self.latest == 0.0:
            return True
        now = time.monotonic()
        if now >= self.latest:
            self.latest = 0.0  # nobody is penalised: skip the lookup until the next offence
            return True
        host = _host(peer)
        offender = self.offenders.get(address_group(host)) if host is not None else None
        if offender is None or now >= offender.until:
            return True
        offender.refused += 1
        self.refused += 1
        self._log_refusal(host or "", offender, now)
        return False

    def _log_refusal(self, host: str, offender: Offender, now: float) -> None:
        """One line at most per LOG_INTERVAL, with a count of the refusals not logged."""
        if now - self._logged_at < LOG_INTERVAL:
            self._unlogged += 1
            return
        more = f" (and {self._unlogged} more since the last such line)" if self._unlogged else ""
        self._logged_at, self._unlogged = now, 0
        log.warning(
            "new connection from %s refused at accept: penalised for HTTP/2 abuse, "
            "%.1f s left, %d refused in this penalty%s",
            host,
            offender.until - now,
            offender.refused,
            more,
        )


def _exempt(host: str, policy: Policy) -> bool:
    """Whether host is in one of the policy's exempt networks."""
    if not policy.exempt:
        return False
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return any(address in network for network in policy.exempt)


def _host(peer: Any) -> str | None:
    """The host part of a socket address ((host, port, ...)), if it has one."""
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return peer[0]
    return None


BOX = PenaltyBox()

"""Where a request comes from: the client behind trusted proxies, as the counters see it."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

IPV6_GROUP = 64  # one subscriber usually holds a whole /64
MAX_UNPARSED = 64
MAX_HOPS = 16  # X-Forwarded-For entries believed at most: real chains are a few proxies long
MEMO_ENTRIES = 4096  # trust verdicts a worker remembers, on texts of at most
MEMO_TEXT_CHARS = 64  # characters (an IPv6 address with a zone and a port fits)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(environ: dict[str, Any]) -> str:
    """The address of the client that sent the request.

    service/forwarded.py has already put the client a trusted proxy reported (see
    forwarded_client) in REMOTE_ADDR; from any other peer, REMOTE_ADDR is the peer itself.
    """
    return str(environ.get("REMOTE_ADDR") or "")


class TrustedProxies:
    """The proxies (TRUSTED_PROXIES) whose X-Forwarded-* headers are believed.

    Parsing an address and matching it against networks costs a few microseconds with the
    ipaddress module, on every request through a proxy, twice or more; the verdicts on
    recent short texts (the ingress's address, clients' addresses) are remembered instead.
    """

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)
        self._verdicts: dict[str, tuple[IPAddress | None, bool]] = {}

    @property
    def remembered(self) -> int:
        """How many verdicts are remembered now."""
        return len(self._verdicts)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trust(self, address: IPAddress | None) -> bool:
        """Whether address belongs to a trusted proxy."""
        return address is not None and any(address in network for network in self.networks)

    def judge(self, text: str) -> tuple[IPAddress | None, bool]:
        """The address in text (see parse_address) and whether it is a trusted proxy's."""
        verdict = self._verdicts.get(text)
        if verdict is None:
            address = parse_address(text)
            verdict = (address, self.trust(address))
            if len(text) <= MEMO_TEXT_CHARS:  # so the memo is bounded in bytes too
                if len(self._verdicts) >= MEMO_ENTRIES:
                    self._verdicts.clear()
                self._verdicts[text] = verdict
        return verdict


def parse_address(text: str) -> IPAddress | None:
    """The IP address in a peer or X-Forwarded-For entry (a port is dropped), None if none.

    An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer) is its IPv4
    address, so that a trusted 10.0.0.0/8 covers ::ffff:10.0.0.7 too.
    """
    text = text.strip()
    if text.startswith("["):  # [2001:db8::1]:443
        text = text[1 : text.find("]")]
    elif text.count(":") == 1:  # 192.0.2.1:443
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_client(
    peer: IPAddress, hops: list[str], trusted: TrustedProxies
) -> tuple[IPAddress, int | None]:
    """The client that peer, a trusted proxy, reports, and its place in hops (None: peer).

    Each proxy appends the address it was connected from, so the list is read from the
    right: every entry a trusted proxy wrote is believed, up to and including the first
    untrusted address, which is the client. Entries left of it were written by the
    client itself and could say anything. An entry that is not an address ends the walk
    at the proxy that wrote it; so does the MAX_HOPS-th entry, trusted or not.
    """
    client, place, believed = peer, None, True
    for index in range(len(hops) - 1, max(-1, len(hops) - 1 - MAX_HOPS), -1):
        if not believed:
            break
        hop, believed = trusted.judge(hops[index])
        if hop is None:
            break
        client, place = hop, index
    return client, place


def address_group(address: str) -> str:
    """The unit failures are counted per: an IPv4 address, or the IPv6 /64 around one."""
    try:
        parsed = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address[:MAX_UNPARSED]  # a unix socket, say: counted as it is
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, IPV6_GROUP), strict=False))
    return str(parsed)

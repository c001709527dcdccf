"""Where a request comes from, as the failure counters see it."""

from __future__ import annotations

import ipaddress
from typing import Any

IPV6_GROUP = 64  # one subscriber usually holds a whole /64
MAX_UNPARSED = 64


def client_address(environ: dict[str, Any]) -> str:
    """The address of the peer that sent the request.

    Behind a reverse proxy every request comes from the proxy; reading X-Forwarded-For
    from trusted hops (a proxy mode) belongs here, and nowhere else.
    """
    return str(environ.get("REMOTE_ADDR") or "")


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

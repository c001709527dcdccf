#!/usr/bin/env python3
"""Container health check: GET /healthz on the address the entrypoint binds.

That is BIND, over TLS; with BIND empty (behind an ingress, `serve --proxy-only`), the
first address of PROXY_BIND, in plain HTTP.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request

# The wildcard addresses are not reachable as such: ask loopback of the same family.
LOOPBACK = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}  # noqa: S104


def healthz_url(bind: str, proxy_bind: str = "") -> str:
    """The URL of /healthz for BIND (or, if empty, PROXY_BIND) such as 0.0.0.0:8443."""
    # The service serves TLS on every BIND address (production refuses to start without a
    # certificate), plain HTTP on PROXY_BIND.
    setting, scheme = ("BIND", "https") if bind else ("PROXY_BIND", "http")
    address = bind or proxy_bind.split(",")[0].strip()
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        raise ValueError(f"{setting}={address!r} is not host:port")
    return f"{scheme}://{LOOPBACK.get(host, host)}:{port}/healthz"


def main() -> int:
    """Exit 0 when /healthz answers 200 within the timeout, 1 otherwise (with the reason)."""
    # The certificate names the public host, not this loopback address: only liveness counts.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        url = healthz_url(os.environ.get("BIND", "0.0.0.0:8443"), os.environ.get("PROXY_BIND", ""))
        with urllib.request.urlopen(url, context=context, timeout=4) as response:  # noqa: S310
            status = response.status
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())

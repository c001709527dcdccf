#!/usr/bin/env python3
"""Container health check: GET /healthz on the address the entrypoint binds (BIND)."""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request

# The wildcard addresses are not reachable as such: ask loopback of the same family.
LOOPBACK = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}  # noqa: S104


def healthz_url(bind: str) -> str:
    """The URL of /healthz for a Hypercorn bind such as 0.0.0.0:8443 or [::1]:8443."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        raise ValueError(f"BIND={bind!r} is not host:port")
    # The service serves TLS on every address it binds (production refuses to start without).
    return f"https://{LOOPBACK.get(host, host)}:{port}/healthz"


def main() -> int:
    """Exit 0 when /healthz answers 200 within the timeout, 1 otherwise (with the reason)."""
    # The certificate names the public host, not this loopback address: only liveness counts.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        url = healthz_url(os.environ.get("BIND", "0.0.0.0:8443"))
        with urllib.request.urlopen(url, context=context, timeout=4) as response:  # noqa: S310
            status = response.status
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())

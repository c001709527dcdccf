"""X-Forwarded-For/Proto/Host, believed only from a trusted proxy (TRUSTED_PROXIES).

A TLS-terminating ingress talks plain HTTP to the service (PROXY_BIND) and reports what
the client's request was: its address, its scheme, its host. From a peer in
TRUSTED_PROXIES, on any listener, the environ is made to say so (REMOTE_ADDR,
wsgi.url_scheme, HTTP_HOST), and everything after it sees the client's request: the
failure counters, Flask's URLs, Authlib's check that OAuth runs over https. From any
other peer the headers are ignored, since anyone can send them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from service.addresses import IPAddress, TrustedProxies, forwarded_client

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# A host name or [IPv6 address], with an optional port: what Host may hold (RFC 9110 7.2).
HOST = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
PLAIN_HTTP = (
    b'{"type":"about:blank","title":"Forbidden","status":403,'
    b'"detail":"This service is served over https only: the request reached the proxy '
    b'over plain HTTP."}'
)


class ForwardedHeaders:
    """WSGI middleware: a trusted proxy's X-Forwarded-* become the request's own.

    With https_only (production), a request a trusted proxy says came over plain HTTP is
    refused (403) rather than served: the client sent its credentials in the clear, and
    an ingress that lets it is misconfigured, which should show at once.
    """

    def __init__(self, app: WsgiApp, trusted: TrustedProxies, *, https_only: bool) -> None:
        self.app = app
        self.trusted = trusted
        self.https_only = https_only

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        peer, trusted = self.trusted.judge(str(environ.get("REMOTE_ADDR", "")))
        if trusted and peer is not None and not self._believe(environ, peer):
            start_response(
                "403 Forbidden",
                [("Content-Type", "application/problem+json"), ("Cache-Control", "no-store")],
            )
            return [PLAIN_HTTP]
        return self.app(environ, start_response)

    def _believe(self, environ: dict[str, Any], peer: IPAddress) -> bool:
        """Put what the proxy reports in environ; False if the request must be refused."""
        hops = _values(environ.get("HTTP_X_FORWARDED_FOR"))
        client, place = forwarded_client(peer, hops, self.trusted)
        environ["REMOTE_ADDR"] = str(client)
        scheme = _reported(environ.get("HTTP_X_FORWARDED_PROTO"), place, len(hops)).lower()
        if scheme in {"http", "https"}:
            environ["wsgi.url_scheme"] = scheme
        host = _reported(environ.get("HTTP_X_FORWARDED_HOST"), place, len(hops))
        if HOST.fullmatch(host):
            environ["HTTP_HOST"] = host
        return not (self.https_only and scheme == "http")


def _values(header: str | None) -> list[str]:
    """The comma-separated entries of a header (repeated headers are already joined)."""
    return [value.strip() for value in header.split(",")] if header else []


def _reported(header: str | None, place: int | None, hops: int) -> str:
    """What a proxy reports about the client's request in an X-Forwarded-Proto/Host header.

    A proxy either replaces the header (one value, the nearest proxy's) or appends to it
    like X-Forwarded-For; then the entry at the client's place in X-Forwarded-For is the
    one about the client's own connection. Empty if the header is absent.
    """
    values = _values(header)
    if not values:
        return ""
    if place is not None and len(values) == hops:
        return values[place]
    return values[-1]

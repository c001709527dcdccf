"""Read the Bearer scheme case-insensitively (RFC 9110 11.1), for every route at once.

Flask-JWT-Extended matches JWT_HEADER_TYPE exactly, so `bearer` or `BEARER` would be
answered "missing token". Rewriting the scheme in the WSGI environ, before Flask reads it,
reaches every route at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

SCHEME = "Bearer"
# The scheme at the start of the header or of any comma-separated credential in it.
ANY_CASE = re.compile(r"(^|,)([ \t]*)bearer(?=[ \t])", re.IGNORECASE)


class BearerScheme:
    """WSGI middleware spelling the Authorization header's Bearer scheme as `Bearer`."""

    def __init__(self, app: WsgiApp) -> None:
        self._app = app

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION")
        if header is not None and not header.startswith(f"{SCHEME} "):
            environ["HTTP_AUTHORIZATION"] = ANY_CASE.sub(rf"\1\2{SCHEME}", header)
        return self._app(environ, start_response)

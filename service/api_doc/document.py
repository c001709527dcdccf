"""The OpenAPI 3.1 document of the service, built from the parts that define its behaviour.

Request bodies come from the models the views validate with, scopes and grant types from
the OAuth server's own lists; tests/test_openapi.py fails when a route of the URL map is
missing here, or described here but gone.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from service.api_doc.paths import PATHS
from service.api_doc.schemas import RESPONSES, SCHEMAS, security_schemes

OPENAPI_VERSION = "3.1.0"

DESCRIPTION = """\
Authentication and authorization: JWT access and refresh tokens whose revocation is \
immediate and durable, and an OAuth 2.0 authorization server.

Errors are RFC 9457 problem details (`application/problem+json`); the OAuth endpoints \
`/oauth/token`, `/oauth/revoke`, `/oauth/introspect` and `/oauth/authorize` answer with \
RFC 6749 error bodies (`application/json`) instead. Every request may also get 405 (with \
`Allow`) for a method the path does not take, and 413 for a body larger than \
`MAX_BODY_BYTES`. Every GET also answers HEAD, and every path OPTIONS.

Served over HTTPS only, HTTP/2 or HTTP/1.1."""

TAGS = [
    {"name": "auth", "description": "First-party accounts and login sessions."},
    {"name": "api", "description": "Protected resources."},
    {"name": "oauth", "description": "The OAuth 2.0 authorization server."},
    {"name": "well-known", "description": "Discovery documents."},
    {"name": "health", "description": "Probes."},
    {"name": "docs", "description": "This document."},
]


def _version() -> str:
    try:
        return version("authsvc")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0.0.0"


def build_document(issuer: str) -> dict[str, Any]:
    """The whole document, for a service whose public base URL is issuer."""
    base_url = issuer.rstrip("/")
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "authsvc",
            "version": _version(),
            "description": DESCRIPTION,
        },
        "servers": [{"url": base_url}],
        "tags": TAGS,
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "responses": RESPONSES,
            "securitySchemes": security_schemes(base_url),
        },
    }

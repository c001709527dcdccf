"""The API document: OpenAPI 3.1 at /openapi.json, and a page made from it at /docs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, render_template

from service.api_doc import page
from service.api_doc.document import build_document
from service.config import Settings
from service.isolation import no_database
from service.oauth.pages import HSTS, PAGE_HEADERS, style_sources

bp = Blueprint("api_doc", __name__, template_folder="templates")
bp.add_app_template_filter(page.with_code, "api_doc_code")

TEMPLATE = "api_docs.html"
# The document changes only with a deployment.
CACHE = "public, max-age=3600"
DOCS_HEADERS = {
    **PAGE_HEADERS,
    "Content-Security-Policy": "default-src 'none'; "
    f"style-src {style_sources(Path(__file__).resolve().parent / 'templates' / TEMPLATE)}; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Cache-Control": CACHE,
}


class ApiDocument:
    """The document of one app, its JSON and its page, each made once."""

    def __init__(self, settings: Settings) -> None:
        self.document: dict[str, Any] = build_document(settings.jwt_issuer)
        self.json = json.dumps(self.document, indent=1).encode()
        self._html: str | None = None
        self._headers = dict(DOCS_HEADERS)
        if not settings.is_development:
            self._headers["Strict-Transport-Security"] = HSTS

    def html(self) -> str:
        """The page (rendered on first use: rendering needs an app context)."""
        if self._html is None:
            self._html = render_template(
                TEMPLATE,
                openapi=self.document["openapi"],
                info=self.document["info"],
                servers=self.document["servers"],
                sections=page.sections(self.document),
                schemas=page.schemas(self.document),
                security_schemes=page.security_schemes(self.document),
            )
        return self._html

    def headers(self) -> dict[str, str]:
        """The page's security and caching headers."""
        return self._headers


def _api_document() -> ApiDocument:
    found: ApiDocument = current_app.extensions["api_document"]
    return found


@bp.get("/openapi.json")
@no_database
def openapi() -> Response:
    """The OpenAPI document."""
    response = Response(_api_document().json, mimetype="application/json")
    response.headers["Cache-Control"] = CACHE
    return response


@bp.get("/docs")
@no_database
def docs() -> Response:
    """The document as a page; it loads nothing, not even a script."""
    found = _api_document()
    response = Response(found.html(), mimetype="text/html")
    response.headers.update(found.headers())
    return response


def init_app(app: Flask, settings: Settings) -> None:
    """Build the document for this app's settings and register its routes."""
    app.extensions["api_document"] = ApiDocument(settings)
    app.register_blueprint(bp)

"""require_scope on an async view, in a throwaway app built from the same factory."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from flask import Flask
from flask_jwt_extended import get_jwt, jwt_required

from service import close_app, create_app
from service.config import Settings
from service.oauth.scopes import require_scope
from tests.conftest import Session


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    """An app with an extra async route guarded by a scope."""
    app = create_app(settings)

    @app.get("/test/async-email")
    @jwt_required()
    @require_scope("email")
    async def async_email() -> dict[str, str]:
        await asyncio.sleep(0)
        return {"sub": get_jwt()["sub"]}

    @app.get("/test/async-admin")
    @jwt_required()
    @require_scope("profile", "admin")
    async def async_admin() -> dict[str, str]:
        return {"sub": get_jwt()["sub"]}

    try:
        yield app
    finally:
        close_app(app)


def test_require_scope_on_async_views(app: Flask, user: Session) -> None:
    http = app.test_client()
    ok = http.get("/test/async-email", headers=user.bearer())
    assert ok.status_code == 200, ok.text
    assert ok.json is not None and ok.json["sub"]
    refused = http.get("/test/async-admin", headers=user.bearer())
    assert refused.status_code == 403
    assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]
    assert 'scope="profile admin"' in refused.headers["WWW-Authenticate"]
    assert http.get("/test/async-email").status_code == 401

"""First-party authentication: accounts, sessions, and JWTs."""

from __future__ import annotations

from flask import Flask

from service.auth import jwt
from service.auth.bearer import BearerScheme
from service.auth.views import bp
from service.config import Settings


def init_app(app: Flask, settings: Settings) -> None:
    """Configure JWTs, accept the Bearer scheme in any case, register the auth blueprint."""
    jwt.init_app(app, settings)
    app.wsgi_app = BearerScheme(app.wsgi_app)  # type: ignore[method-assign]
    app.register_blueprint(bp)

"""authsvc: JWT sessions with immediate, durable revocation, and an OAuth 2.0 server."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from flask import Flask

from service import access, errors, exposition, health, store
from service.config import Settings, load_settings
from service.cookies import LazyCookieSessions
from service.loop import LoopThread
from service.store.throttle import Throttle, make_throttle

log = logging.getLogger(__name__)


class ServiceFlask(Flask):
    """Flask whose async views run on the process's long-lived loop, not a loop per call."""

    session_interface = LazyCookieSessions()
    request_class = access.RouteNotingRequest

    def async_to_sync(self, func: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        """Run coroutine views on this app's loop thread."""
        loop: LoopThread = self.extensions["loop"]
        return loop.wrap(func)


def create_app(settings: Settings | None = None) -> ServiceFlask:
    """Build the application; nothing here opens a socket or starts a loop."""
    settings = settings or load_settings()
    app = ServiceFlask(__name__, instance_path=str(settings.instance_dir.resolve()))
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        JSON_SORT_KEYS=False,
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )
    loop = LoopThread()
    app.extensions["loop"] = loop
    app.extensions["settings"] = settings
    store.init_app(app, settings, loop)
    app.extensions["throttle"] = make_throttle(settings)
    _init_passwords(app, settings)
    errors.init_app(app)
    _register_blueprints(app, settings)
    exposition.init_app(app, settings)
    access.init_app(app, access_log=settings.logs_requests)
    return app


def _init_passwords(app: Flask, settings: Settings) -> None:
    from service.auth.passwords import Passwords

    app.extensions["passwords"] = Passwords(settings)


def _register_blueprints(app: Flask, settings: Settings) -> None:
    from service import auth, oauth
    from service.api.views import bp as api_bp

    app.register_blueprint(health.bp)
    auth.init_app(app, settings)
    oauth.init_app(app)
    app.register_blueprint(api_bp)


def warm_up(app: Flask) -> None:
    """Open pools and load the blocklist before the first request; never fails start-up."""
    loop: LoopThread = app.extensions["loop"]
    app_store: store.Store = app.extensions["store"]
    keyring = app.extensions.get("oauth_keyring")
    try:
        app_store.start_maintenance()
        loop.run(app_store.warm_up(), timeout=30)
        if keyring is not None:
            loop.run(keyring.load(), timeout=30)
    except Exception as exc:
        log.warning("backends not ready at start-up (%s); /readyz will tell", type(exc).__name__)


def close_app(app: Flask) -> None:
    """Release the app's connections and stop its loop (at worker shutdown)."""
    loop: LoopThread = app.extensions["loop"]
    app_store: store.Store = app.extensions["store"]
    throttle: Throttle = app.extensions["throttle"]
    try:
        loop.run(app_store.close(), timeout=5)
        loop.run(throttle.close(), timeout=5)
    finally:
        app.extensions["passwords"].shutdown()
        loop.stop()

"""authsvc: JWT sessions with immediate, durable revocation, and an OAuth 2.0 server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from flask import Flask

from service import access, errors, exposition, health, store
from service.addresses import TrustedProxies
from service.config import Settings, load_settings
from service.cookies import LazyCookieSessions
from service.forwarded import ForwardedHeaders
from service.loop import WorkerLoop
from service.store.throttle import Throttle, make_throttle

log = logging.getLogger(__name__)

STARTUP_SECONDS = 30


class ServiceFlask(Flask):
    """Flask whose async views run on the worker's one loop, not a fresh loop per call."""

    session_interface = LazyCookieSessions()
    request_class = access.RouteNotingRequest

    def async_to_sync(self, func: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        """Run coroutine views on the worker's loop; the request waits for them suspended."""
        loop: WorkerLoop = self.extensions["loop"]
        return loop.wrap(func)


def create_app(settings: Settings | None = None) -> ServiceFlask:
    """Build the application; nothing here opens a socket or starts a loop."""
    settings = settings or load_settings()
    # No static folder: nothing is served from one, and an undocumented route would be.
    app = ServiceFlask(
        __name__, instance_path=str(settings.instance_dir.resolve()), static_folder=None
    )
    app.config.update(
        SECRET_KEY=settings.secret_key,
        SECRET_KEY_FALLBACKS=settings.secret_keys[1:],
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        JSON_SORT_KEYS=False,
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )
    loop = WorkerLoop()
    app.extensions["loop"] = loop
    app.extensions["settings"] = settings
    store.init_app(app, settings, loop)
    app.extensions["throttle"] = make_throttle(settings)
    _init_passwords(app, settings)
    errors.init_app(app)
    _register_blueprints(app, settings)
    _believe_trusted_proxies(app, settings)
    exposition.init_app(app, settings)
    access.init_app(app, access_log=settings.logs_requests)
    return app


def _believe_trusted_proxies(app: Flask, settings: Settings) -> None:
    """Take the client, scheme and host from X-Forwarded-* when a trusted proxy sends them."""
    trusted = TrustedProxies(settings.trusted_networks)
    if trusted:  # otherwise nothing to do on any request: no layer at all
        app.wsgi_app = ForwardedHeaders(  # type: ignore[method-assign]
            app.wsgi_app, trusted, https_only=not settings.is_development
        )


def _init_passwords(app: Flask, settings: Settings) -> None:
    from service.auth.passwords import Passwords

    app.extensions["passwords"] = Passwords(settings)


def _register_blueprints(app: Flask, settings: Settings) -> None:
    from service import api_doc, auth, oauth
    from service.api.views import bp as api_bp

    app.register_blueprint(health.bp)
    auth.init_app(app, settings)
    oauth.init_app(app)
    app.register_blueprint(api_bp)
    api_doc.init_app(app, settings)


async def start_app(app: Flask) -> None:
    """Adopt the server's loop, open pools and load the blocklist; never fails start-up."""
    loop: WorkerLoop = app.extensions["loop"]
    loop.attach()
    app_store: store.Store = app.extensions["store"]
    keyring = app.extensions.get("oauth_keyring")
    app_store.start_maintenance()
    try:
        async with asyncio.timeout(STARTUP_SECONDS):
            await app_store.warm_up()
            if keyring is not None:
                await keyring.load()
    except Exception as exc:
        reason = store.failure_reason(exc)
        log.warning("backends not ready at start-up (%s); /readyz will tell", reason)


async def stop_app(app: Flask) -> None:
    """Release the app's connections, on the loop that owns them (at worker shutdown)."""
    try:
        await _release(app)
    finally:
        app.extensions["passwords"].shutdown()
        app.extensions["loop"].stop()


def close_app(app: Flask) -> None:
    """The same, from outside the loop (a command, a test that drove the app directly)."""
    loop: WorkerLoop = app.extensions["loop"]
    try:
        loop.run(_release(app), timeout=5)
    finally:
        app.extensions["passwords"].shutdown()
        loop.stop()


async def _release(app: Flask) -> None:
    app_store: store.Store = app.extensions["store"]
    throttle: Throttle = app.extensions["throttle"]
    await app_store.close()
    await throttle.close()

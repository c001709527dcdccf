"""Flask's signed-cookie sessions, without their cost on requests that carry no cookie."""

from __future__ import annotations

from flask import Flask, Request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface


class LazyCookieSessions(SecureCookieSessionInterface):
    """Only the browser pages use sessions: API requests send no cookie and build no signer."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        """An empty session at no cost when the request has no session cookie."""
        if app.secret_key and (
            "HTTP_COOKIE" not in request.environ  # skips parsing every header for cookies
            or self.get_cookie_name(app) not in request.cookies
        ):
            return self.session_class()
        return super().open_session(app, request)

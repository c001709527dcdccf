"""OAuth 2.0 authorization server on Authlib, sharing the core's tokens and blocklist."""

from __future__ import annotations

from flask import Flask

from service.oauth.keys import Keyring
from service.oauth.server import create_server
from service.oauth.views import bp


def init_app(app: Flask) -> None:
    """Attach the keyring and the authorization server, and register the blueprint."""
    app.extensions["oauth_keyring"] = Keyring(app.extensions["store"])
    app.extensions["oauth_server"] = create_server(app)
    app.register_blueprint(bp)

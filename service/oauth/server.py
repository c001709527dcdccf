"""The Authlib authorization server: grants, endpoints, client lookup and token storage."""

from __future__ import annotations

import logging
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749.errors import InvalidClientError, UnsupportedResponseTypeError
from flask import Flask

from service import metrics
from service.oauth import bridge, client_throttle, families
from service.oauth.clients import find_clients, plausible_identifier, recall_client
from service.oauth.endpoints import IntrospectionEndpoint, RevocationEndpoint
from service.oauth.grants import (
    AuthorizationCodeGrant,
    ClientCredentialsGrant,
    RefreshTokenGrant,
    S256Challenge,
)
from service.oauth.models import Client
from service.oauth.scopes import SCOPES


class Server(AuthorizationServer):  # type: ignore[misc]
    """Authorization server whose hooks reach the async store through the app's loop."""

    def authenticate_client(self, request: Any, methods: list[str], endpoint: str = "token") -> Any:
        try:
            return super().authenticate_client(request, methods, endpoint)
        except ValueError as exc:
            # Basic credentials that are not ASCII base64 of UTF-8, or a bare scheme, name
            # no client: Authlib raises on them instead of failing the authentication.
            unreadable = InvalidClientError(
                description="The client credentials cannot be read.", status_code=401
            )
            raise client_throttle.counted(unreadable) from exc
        except InvalidClientError as failure:
            # Counted per client id and address: past a limit, 429 slow_down instead.
            raise client_throttle.counted(failure) from None

    def get_authorization_grant(self, request: Any) -> Any:
        """Authlib's, but an unsupported response_type is not echoed into the error.

        Authlib makes the requested response_type the error's description, and refuses to
        build an error whose description has a character RFC 6749 5.2 forbids there (any
        non-ASCII, a quote, a backslash): a ValueError, so a 500 instead of the error.
        """
        if any(
            grant.check_authorization_endpoint(request) for grant, _ in self._authorization_grants
        ):
            return super().get_authorization_grant(request)
        raise UnsupportedResponseTypeError(
            request.payload.response_type,
            description="The response_type is not supported; only code is.",
            state=request.payload.state,
            redirect_uri=self._error_redirect_uri(request),
        )

    def _error_redirect_uri(self, request: Any) -> str | None:
        """Where to report an error: the client's redirect URI once both check out (4.1.2.1)."""
        client = self.query_client(request.payload.client_id or "")
        if client is None:
            return None
        requested: str | None = request.payload.redirect_uri
        if requested:
            return requested if client.check_redirect_uri(requested) else None
        default: str | None = client.get_default_redirect_uri()
        return default

    def query_client(self, client_id: str) -> Client | None:
        if not plausible_identifier(client_id):
            return None
        store = bridge.store()
        kept, keep = recall_client(store, client_id)
        if kept is not None:
            return kept
        found = bridge.run(find_clients(database=store.db, client_ids=[client_id]))[client_id]
        if found is not None:
            keep(found)
        return found

    def save_token(self, token: dict[str, Any], request: Any) -> None:
        if "refresh_token" not in token:
            metrics.tokens_issued("oauth_access" if request.user else "client_credentials")
            return
        bridge.run(
            families.save_refresh_token(
                store=bridge.store(),
                token=token["refresh_token"],
                family=request.family,
                client_id=request.client.client_id,
                user_id=request.user.id,
                scope=token["scope"],
            )
        )
        metrics.tokens_issued("oauth_access", "oauth_refresh")


def create_server(app: Flask) -> Server:
    """Configure the grants and endpoints the service offers, and nothing else."""
    # Authlib's debug messages include issued tokens: keep them out of any log.
    logging.getLogger("authlib").setLevel(logging.INFO)
    app.config.setdefault("OAUTH2_SCOPES_SUPPORTED", list(SCOPES))
    server = Server()
    server.init_app(app)
    server.register_grant(AuthorizationCodeGrant, [S256Challenge(required=True)])
    server.register_grant(RefreshTokenGrant)
    server.register_grant(ClientCredentialsGrant)
    server.register_endpoint(RevocationEndpoint)
    server.register_endpoint(IntrospectionEndpoint)
    return server


def metadata(*, issuer: str) -> dict[str, Any]:
    """RFC 8414 metadata describing exactly what create_server() registers.

    Every URL is built from the configured issuer, never from the request's Host header.
    """
    secret_auth = ["client_secret_basic", "client_secret_post"]
    base_url = issuer.rstrip("/")
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{base_url}/oauth/authorize",
        "token_endpoint": f"{base_url}/oauth/token",
        "revocation_endpoint": f"{base_url}/oauth/revoke",
        "introspection_endpoint": f"{base_url}/oauth/introspect",
        "jwks_uri": f"{base_url}/.well-known/jwks.json",
        "scopes_supported": list(SCOPES),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "token_endpoint_auth_methods_supported": [*secret_auth, "none"],
        "revocation_endpoint_auth_methods_supported": [*secret_auth, "none"],
        "introspection_endpoint_auth_methods_supported": secret_auth,
        "code_challenge_methods_supported": ["S256"],
    }

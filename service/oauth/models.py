"""What Authlib sees: clients, codes and tokens as plain objects built from stored rows."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from authlib.oauth2.rfc6749 import AuthorizationCodeMixin, ClientMixin, TokenMixin
from authlib.oauth2.rfc6749.util import scope_to_list
from sqlalchemy import Row

from service.store.oauth_models import OAuthClient, OAuthCode, OAuthRefreshToken


def digest(value: str) -> str:
    """SHA-256 hex digest of a high-entropy secret, code or refresh token.

    A fast hash is enough here: these values are 256-bit random strings, not passwords, so
    brute force is hopeless, and a slow KDF would cost every token request tens of ms.
    """
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Client(ClientMixin):  # type: ignore[misc]
    """A registered client."""

    client_id: str
    name: str
    secret_hash: str | None
    redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    scope: str
    auth_method: str
    resource_server: bool = False

    @classmethod
    def from_row(cls, row: OAuthClient | Row[Any]) -> Client:
        """Build from the stored row (an ORM object or a result row)."""
        return cls(
            client_id=row.client_id,
            name=row.name,
            secret_hash=row.secret_hash,
            redirect_uris=tuple(row.redirect_uris),
            grant_types=tuple(row.grant_types),
            scope=row.scope,
            auth_method=row.auth_method,
            resource_server=bool(row.resource_server),
        )

    @property
    def is_public(self) -> bool:
        """Whether the client has no secret (auth method "none")."""
        return self.auth_method == "none"

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str:
        """The requested scopes this client is registered for; asking for none grants none."""
        allowed = set(scope_to_list(self.scope) or ())
        requested = dict.fromkeys(scope_to_list(scope) or ())
        return " ".join(s for s in requested if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        if self.secret_hash is None:
            return False
        # Constant-time comparison of digests: no timing signal about the stored value.
        return hmac.compare_digest(digest(client_secret), self.secret_hash)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if endpoint == "introspection" and self.is_public:
            return False
        return method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


@dataclass(frozen=True, slots=True)
class AuthorizationCode(AuthorizationCodeMixin):  # type: ignore[misc]
    """A redeemed authorization code and the grant it starts."""

    grant_id: str
    grant_expires: int
    user_id: uuid.UUID
    redirect_uri: str
    scope: str
    code_challenge: str
    code_challenge_method: str

    @classmethod
    def from_row(cls, row: OAuthCode, grant_expires: datetime) -> AuthorizationCode:
        """Build from the stored row."""
        return cls(
            grant_id=row.grant_id,
            grant_expires=int(grant_expires.timestamp()),
            user_id=row.user_id,
            redirect_uri=row.redirect_uri,
            scope=row.scope,
            code_challenge=row.code_challenge,
            code_challenge_method=row.code_challenge_method,
        )

    def get_redirect_uri(self) -> str | None:
        return self.redirect_uri or None

    def get_scope(self) -> str:
        return self.scope


@dataclass(frozen=True, slots=True)
class RefreshToken(TokenMixin):  # type: ignore[misc]
    """An opaque refresh token as stored, with its grant's state."""

    grant_id: str
    grant_expires: int
    client_id: str
    user_id: uuid.UUID | None
    scope: str
    issued_at: int
    expires_at: int
    revoked: bool

    @classmethod
    def from_row(
        cls, row: OAuthRefreshToken, *, grant_expires: datetime, grant_revoked: bool
    ) -> RefreshToken:
        """Build from the stored rows."""
        return cls(
            grant_id=row.grant_id,
            grant_expires=int(grant_expires.timestamp()),
            client_id=row.client_id,
            user_id=row.user_id,
            scope=row.scope,
            issued_at=int(row.created_at.timestamp()),
            expires_at=int(row.expires_at.timestamp()),
            revoked=grant_revoked or row.revoked_at is not None or row.used_at is not None,
        )

    def check_client(self, client: Client) -> bool:
        return self.client_id == client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_at - self.issued_at

    def is_expired(self) -> bool:
        return self.expires_at <= time.time()

    def is_revoked(self) -> bool:
        return self.revoked

    def introspection(self) -> dict[str, Any]:
        """RFC 7662 members of an active refresh token."""
        return {
            "token_type": "refresh_token",
            "client_id": self.client_id,
            "scope": self.scope,
            "sub": str(self.user_id) if self.user_id else self.client_id,
            "exp": self.expires_at,
            "iat": self.issued_at,
        }


@dataclass(frozen=True, slots=True)
class AccessToken(TokenMixin):  # type: ignore[misc]
    """A verified JWT access token and whether the blocklist has revoked it."""

    claims: dict[str, Any]
    revoked: bool

    def check_client(self, client: Client) -> bool:
        return bool(self.claims.get("client_id") == client.client_id)

    def get_scope(self) -> str:
        return str(self.claims.get("scope", ""))

    def get_expires_in(self) -> int:
        return int(self.claims["exp"]) - int(self.claims["iat"])

    def is_expired(self) -> bool:
        return int(self.claims["exp"]) <= time.time()

    def is_revoked(self) -> bool:
        return self.revoked

    def introspection(self) -> dict[str, Any]:
        """RFC 7662 members of an active access token."""
        keys = ("client_id", "scope", "sub", "aud", "iss", "exp", "iat", "nbf", "jti")
        return {"token_type": "Bearer", **{k: self.claims[k] for k in keys if k in self.claims}}

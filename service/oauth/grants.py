"""Authlib grants with our persistence: code + PKCE (S256 only), refresh rotation, client creds."""

from __future__ import annotations

import time
from typing import Any

from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import InvalidGrantError, InvalidRequestError, InvalidScopeError
from authlib.oauth2.rfc6749.util import scope_to_list
from authlib.oauth2.rfc7636 import CodeChallenge

from service import metrics
from service.ids import new_id
from service.oauth import bridge, families
from service.oauth.models import AuthorizationCode, Client, RefreshToken
from service.oauth.tokens import Family, new_refresh_token, sign_access_token
from service.store import users as user_store
from service.store.users import Account

SECRET_AUTH = ["client_secret_basic", "client_secret_post"]


class S256Challenge(CodeChallenge):  # type: ignore[misc]
    """PKCE for every client, public or confidential, with S256 only."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: missing 'code_challenge'.")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("'code_challenge_method' must be S256.")
        super().validate_code_challenge(grant, redirect_uri)

    def validate_code_verifier(self, grant: Any, result: Any) -> None:
        if not grant.request.form.get("code_verifier"):
            raise InvalidRequestError("Missing 'code_verifier'.")
        super().validate_code_verifier(grant, result)


def _account(user_id: Any) -> Account | None:
    """The account tokens are issued for; None (invalid_grant) if it is gone or disabled."""

    async def lookup() -> Account | None:
        async with bridge.store().db.session() as session:
            return await user_store.get_account(session, user_id=user_id)

    account = bridge.run(lookup())
    return None if account is None or account.disabled else account


class FamilyTokens:
    """Issue tokens bound to the grant's family instead of Authlib's default generator."""

    request: Any

    def family(self) -> Family:
        """The family the tokens of this request belong to."""
        raise NotImplementedError

    def granted_scope(self, scope: str | None) -> str:
        """The scope the tokens carry: what was granted, never more than the client may have."""
        return str(self.request.client.get_allowed_scope(scope))

    def generate_token(
        self,
        user: Account | None = None,
        scope: str | None = None,
        grant_type: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        settings, client = bridge.settings(), self.request.client
        family = self.family()
        scope = self.granted_scope(scope)
        access, lifetime = sign_access_token(
            key=bridge.keyring().signing_key(),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            subject=str(user.id) if user else client.client_id,
            client_id=client.client_id,
            scope=scope,
            name=user.username if user else client.name,
            family=family,
            ttl=settings.access_token_ttl,
        )
        token: dict[str, Any] = {
            "token_type": "Bearer",
            "access_token": access,
            "expires_in": lifetime,
            "scope": scope,
        }
        if include_refresh_token and user is not None:
            token["refresh_token"] = new_refresh_token()
        # save_token reads the family from the request to store the refresh token.
        self.request.family = family
        return token


class AuthorizationCodeGrant(FamilyTokens, grants.AuthorizationCodeGrant):  # type: ignore[misc]
    """Authorization code grant; codes are spent atomically in query_authorization_code."""

    TOKEN_ENDPOINT_AUTH_METHODS = [*SECRET_AUTH, "none"]

    @staticmethod
    def validate_authorization_redirect_uri(request: Any, client: Client) -> str:
        """Authlib's check, without the requested URI in the error's description.

        Authlib echoes the URI there, and refuses to build an error whose description has
        a character RFC 6749 5.2 forbids (non-ASCII, a quote, a backslash): a ValueError,
        so a 500 instead of invalid_request.
        """
        requested = request.payload.redirect_uri
        if requested and not client.check_redirect_uri(requested):
            raise InvalidRequestError("The redirect_uri is not registered for this client.")
        found: str = grants.AuthorizationCodeGrant.validate_authorization_redirect_uri(
            request, client
        )
        return found

    def family(self) -> Family:
        code: AuthorizationCode = self.request.authorization_code
        return Family(grant_id=code.grant_id, expires_at=code.grant_expires)

    def validate_requested_scope(self) -> None:
        """Refuse a request that would be granted no scope: empty never means everything."""
        super().validate_requested_scope()
        if not self.request.client.get_allowed_scope(self.request.payload.scope):
            raise InvalidScopeError("Ask for at least one scope this client is registered for.")

    def save_authorization_code(self, code: str, request: Any) -> None:
        client: Client = request.client
        data = request.payload.data
        bridge.run(
            families.start_authorization(
                store=bridge.store(),
                code=code,
                client_id=client.client_id,
                user_id=request.user.id,
                redirect_uri=request.payload.redirect_uri or "",
                scope=request.scope,
                code_challenge=data["code_challenge"],
                code_challenge_method=data["code_challenge_method"],
            )
        )

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        return bridge.run(
            families.redeem_code(store=bridge.store(), code=code, client_id=client.client_id)
        )

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        """Nothing to do: the code was spent when it was looked up."""

    def authenticate_user(self, authorization_code: AuthorizationCode) -> Account | None:
        return _account(authorization_code.user_id)


class RefreshTokenGrant(FamilyTokens, grants.RefreshTokenGrant):  # type: ignore[misc]
    """Refresh grant: every use spends the token and issues a new one in the same family.

    The presented token is only looked up while the request is validated; it is spent in
    the transaction that stores its successor, so a refused request leaves it usable.
    """

    TOKEN_ENDPOINT_AUTH_METHODS = [*SECRET_AUTH, "none"]
    INCLUDE_NEW_REFRESH_TOKEN = True

    def family(self) -> Family:
        token: RefreshToken = self.request.refresh_token
        return Family(grant_id=token.grant_id, expires_at=token.grant_expires)

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshToken | None:
        client: Client = self.request.client
        store = bridge.store()
        token = bridge.run(
            families.find_usable_refresh_token(
                store=store, token=refresh_token, client_id=client.client_id
            )
        )
        if token is None or families.is_family_blocked(store=store, token=token):
            return None
        return token

    def _validate_token_scope(self, token: RefreshToken) -> None:
        requested = self.request.payload.scope
        if requested is None:
            return
        wanted = set(scope_to_list(requested) or ())
        if not wanted or not wanted <= set(scope_to_list(token.get_scope()) or ()):
            raise InvalidScopeError()

    def authenticate_user(self, refresh_token: RefreshToken) -> Account | None:
        return _account(refresh_token.user_id) if refresh_token.user_id else None

    def save_token(self, token: dict[str, Any]) -> None:
        """Spend the presented token and store its successor in one transaction."""
        request = self.request
        rotated = bridge.run(
            families.rotate_refresh_token(
                store=bridge.store(),
                presented=request.form["refresh_token"],
                successor=token["refresh_token"],
                family=request.family,
                client_id=request.client.client_id,
                user_id=request.user.id,
                scope=token["scope"],
            )
        )
        if not rotated:
            raise InvalidGrantError()
        metrics.tokens_issued("oauth_access", "oauth_refresh")

    def revoke_old_credential(self, refresh_token: RefreshToken) -> None:
        """Nothing to do: the token was spent when its successor was saved."""


class ClientCredentialsGrant(FamilyTokens, grants.ClientCredentialsGrant):  # type: ignore[misc]
    """Client credentials grant for confidential clients; each token is its own family."""

    TOKEN_ENDPOINT_AUTH_METHODS = SECRET_AUTH

    def family(self) -> Family:
        expires = int(time.time()) + bridge.settings().access_token_ttl
        return Family(grant_id=new_id(), expires_at=expires)

    def validate_requested_scope(self) -> None:
        """An explicit scope must name something the client is registered for."""
        super().validate_requested_scope()
        requested = self.request.payload.scope
        if requested is not None and not self.request.client.get_allowed_scope(requested):
            raise InvalidScopeError("Ask for at least one scope this client is registered for.")

    def granted_scope(self, scope: str | None) -> str:
        """No scope parameter: the client acts for itself with every scope it is registered for."""
        client: Client = self.request.client
        return client.scope if scope is None else str(client.get_allowed_scope(scope))

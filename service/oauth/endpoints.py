"""Token revocation (RFC 7009) and introspection (RFC 7662) for both kinds of token."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from authlib.oauth2.rfc7009 import RevocationEndpoint as _RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint as _IntrospectionEndpoint

from service.events import audit
from service.oauth import bridge, families
from service.oauth.models import AccessToken, Client, RefreshToken
from service.oauth.tokens import decode_access_token
from service.store.blocklist import BlocklistUnavailable, TokenRef, Verdict

SECRET_AUTH = ["client_secret_basic", "client_secret_post"]


def find_token(token: str, hint: str | None) -> AccessToken | RefreshToken | None:
    """Identify a token: a JWT we signed, else a refresh token; None when unknown."""
    if token.count(".") == 2 and hint != "refresh_token":
        settings = bridge.settings()
        claims = decode_access_token(
            token,
            keyring=bridge.keyring(),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
        return None if claims is None else AccessToken(claims, revoked=_revoked(claims))
    found = bridge.run(families.find_refresh_token(store=bridge.store(), token=token))
    if found is None or found.revoked:
        return found
    try:
        blocked = families.is_family_blocked(store=bridge.store(), token=found)
    except BlocklistUnavailable:
        blocked = True
    return replace(found, revoked=True) if blocked else found


def _revoked(claims: dict[str, Any]) -> bool:
    try:
        verdict = bridge.store().verdict(TokenRef.from_claims(claims))
    except BlocklistUnavailable:
        return True  # introspection fails closed: "inactive" is the safe answer
    return verdict is not Verdict.VALID


class RevocationEndpoint(_RevocationEndpoint):  # type: ignore[misc]
    """Revoke a refresh token with its whole family, or one access token by jti."""

    CLIENT_AUTH_METHODS = [*SECRET_AUTH, "none"]

    def query_token(self, token_string: str, token_type_hint: str | None) -> Any:
        return find_token(token_string, token_type_hint)

    def revoke_token(self, token: AccessToken | RefreshToken, request: Any) -> None:
        store = bridge.store()
        grant = token.grant_id if isinstance(token, RefreshToken) else token.claims.get("sid")
        audit("oauth_token_revoked", client_id=request.client.client_id, grant_id=grant)
        if isinstance(token, RefreshToken):
            bridge.run(
                families.revoke_family(store=store, grant_id=token.grant_id, reason="revoked")
            )
        elif not token.is_expired():
            claims = token.claims
            bridge.run(
                families.revoke_access_token(
                    store=store,
                    jti=claims["jti"],
                    exp=int(claims["exp"]),
                    sub=str(claims["sub"]) if claims.get("sub") is not None else None,
                )
            )


class IntrospectionEndpoint(_IntrospectionEndpoint):  # type: ignore[misc]
    """Answer a confidential client about its own tokens, a resource server about any."""

    CLIENT_AUTH_METHODS = SECRET_AUTH

    def query_token(self, token_string: str, token_type_hint: str | None) -> Any:
        return find_token(token_string, token_type_hint)

    def check_permission(self, token: Any, client: Client, request: Any) -> bool:
        # Another client's token is reported inactive: no token metadata leaks to it.
        return client.resource_server or bool(token.check_client(client))

    def introspect_token(self, token: AccessToken | RefreshToken) -> dict[str, Any]:
        return {"active": True, **token.introspection()}

"""Grants as token families: start, redeem codes, rotate refresh tokens, revoke as a whole."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

from service import metrics
from service.events import audit
from service.ids import new_id
from service.oauth.models import AuthorizationCode, RefreshToken, digest
from service.oauth.tokens import Family
from service.store import Store
from service.store import oauth_grants as grant_store
from service.store.blocklist import BlocklistUnavailable, Entry, Kind, TokenRef, Verdict
from service.store.models import utcnow
from service.store.oauth_models import OAuthCode, OAuthGrant, OAuthRefreshToken

CODE_TTL = 600  # RFC 6749 section 4.1.2: at most 10 minutes


async def start_authorization(
    *,
    store: Store,
    code: str,
    client_id: str,
    user_id: uuid.UUID,
    redirect_uri: str,
    scope: str,
    code_challenge: str,
    code_challenge_method: str,
) -> None:
    """Open a grant for an approved request and store its code (hashed)."""
    now = utcnow()
    grant = OAuthGrant(
        id=new_id(),
        client_id=client_id,
        user_id=user_id,
        scope=scope,
        expires_at=now + timedelta(seconds=store.settings.refresh_token_ttl),
    )
    row = OAuthCode(
        code_hash=digest(code),
        grant_id=grant.id,
        client_id=client_id,
        user_id=user_id,
        redirect_uri=redirect_uri,
        scope=scope,
        code_challenge=code_challenge,
        code_challenge_method=code_challenge_method,
        expires_at=now + timedelta(seconds=CODE_TTL),
    )
    async with store.db.session() as session:
        await grant_store.open_grant_with_code(session, grant=grant, code=row)


async def redeem_code(*, store: Store, code: str, client_id: str) -> AuthorizationCode | None:
    """Spend a code once; a second redemption revokes everything the first one issued."""
    async with store.db.session() as session:
        spent = await grant_store.redeem_code(session, code_hash=digest(code), client_id=client_id)
        grant = (
            await grant_store.get_grant(session, grant_id=spent.row.grant_id) if spent.row else None
        )
    if spent.replayed_grant:
        audit("code_replay", client_id=client_id, grant_id=spent.replayed_grant)
        await revoke_family(store=store, grant_id=spent.replayed_grant, reason="code-replay")
    if spent.row is None or grant is None or grant.revoked_at is not None:
        return None
    return AuthorizationCode.from_row(spent.row, grant.expires_at)


async def find_usable_refresh_token(
    *, store: Store, token: str, client_id: str
) -> RefreshToken | None:
    """A live refresh token of this client, left unspent; a spent one revokes its family."""
    async with store.db.session() as session:
        found = await grant_store.find_live_refresh_token(
            session, token_hash=digest(token), client_id=client_id
        )
        grant = (
            await grant_store.get_grant(session, grant_id=found.row.grant_id) if found.row else None
        )
    if found.replayed_grant:
        await _revoke_replayed(store=store, grant_id=found.replayed_grant, client_id=client_id)
    if found.row is None or grant is None:
        return None
    return RefreshToken.from_row(found.row, grant_expires=grant.expires_at, grant_revoked=False)


async def rotate_refresh_token(
    *,
    store: Store,
    presented: str,
    successor: str,
    family: Family,
    client_id: str,
    user_id: uuid.UUID,
    scope: str,
) -> bool:
    """Spend presented and store successor in one transaction.

    False when presented was spent in the meantime (a concurrent use): that is a replay,
    and the family is revoked.
    """
    row = _refresh_row(
        token=successor, family=family, client_id=client_id, user_id=user_id, scope=scope
    )
    async with store.db.session() as session:
        spent = await grant_store.replace_refresh_token(
            session, token_hash=digest(presented), client_id=client_id, successor=row
        )
    if spent.replayed_grant:
        await _revoke_replayed(store=store, grant_id=spent.replayed_grant, client_id=client_id)
    return spent.row is not None


async def _revoke_replayed(*, store: Store, grant_id: str, client_id: str) -> None:
    audit("oauth_refresh_replay", client_id=client_id, grant_id=grant_id)
    await revoke_family(store=store, grant_id=grant_id, reason="refresh-reuse")


def _refresh_row(
    *, token: str, family: Family, client_id: str, user_id: uuid.UUID, scope: str
) -> OAuthRefreshToken:
    return OAuthRefreshToken(
        token_hash=digest(token),
        grant_id=family.grant_id,
        client_id=client_id,
        user_id=user_id,
        scope=scope,
        expires_at=datetime.fromtimestamp(family.expires_at, UTC),
    )


async def save_refresh_token(
    *, store: Store, token: str, family: Family, client_id: str, user_id: uuid.UUID, scope: str
) -> None:
    """Store the first refresh token of a family; it lives as long as the family."""
    row = _refresh_row(
        token=token, family=family, client_id=client_id, user_id=user_id, scope=scope
    )
    async with store.db.session() as session:
        await grant_store.save_refresh_token(session, token=row)


async def find_refresh_token(*, store: Store, token: str) -> RefreshToken | None:
    """Look a refresh token up in any state (for revocation and introspection)."""
    async with store.db.session() as session:
        found = await grant_store.find_refresh_token(session, token_hash=digest(token))
    if found is None:
        return None
    row, grant = found
    return RefreshToken.from_row(
        row, grant_expires=grant.expires_at, grant_revoked=grant.revoked_at is not None
    )


async def revoke_family(*, store: Store, grant_id: str, reason: str) -> None:
    """Revoke a grant: its refresh tokens in PostgreSQL, its access tokens by sid."""
    async with store.db.session() as session:
        expires_at, sub = await grant_store.revoke_grant(session, grant_id=grant_id, reason=reason)
    metrics.revoked(reason)  # recorded: the grant's row says so from here on
    until = (
        int(expires_at.timestamp())
        if expires_at
        else int(time.time()) + store.settings.refresh_token_ttl
    )
    await store.revoke([Entry(kind=Kind.SESSION, subject=grant_id, expires_at=until, user=sub)])


async def revoke_access_token(*, store: Store, jti: str, exp: int, sub: str | None = None) -> None:
    """Revoke one access token (of subject sub) by jti until it expires."""
    async with store.revoking() as (_, revocations):
        revocations.append(Entry(kind=Kind.TOKEN, subject=jti, expires_at=exp, user=sub))
        metrics.revoked("revoked")


def is_family_blocked(*, store: Store, token: RefreshToken) -> bool:
    """Whether the blocklist has ended this refresh token's family (say, by logout-all).

    A plain function, like the access-token check: it waits for the store's answer.
    """
    ref = TokenRef(
        jti=token.grant_id,
        exp=token.grant_expires,
        sid=token.grant_id,
        sxp=token.grant_expires,
        sub=str(token.user_id) if token.user_id else token.client_id,
    )
    verdict = store.verdict(ref)
    if verdict is Verdict.NOT_LOADED:
        raise BlocklistUnavailable("blocklist is being rebuilt")
    return verdict is Verdict.REVOKED

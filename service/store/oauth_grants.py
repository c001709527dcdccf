"""OAuth grants (token families), authorization codes and refresh tokens.

Codes and refresh tokens are spent with one conditional UPDATE ... RETURNING, so two
concurrent redemptions cannot both succeed; the loser learns it was a replay. A refresh
token is spent in the same transaction that stores its successor.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from sqlalchemy import ColumnElement, and_, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.store.models import utcnow
from service.store.oauth_models import OAuthCode, OAuthGrant, OAuthRefreshToken

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Redemption(Generic[T]):
    """Outcome of spending a code or refresh token: the row, or the grant it replayed."""

    row: T | None = None
    replayed_grant: str | None = None


async def open_grant_with_code(
    session: AsyncSession,
    *,
    grant: OAuthGrant,
    code: OAuthCode,
) -> None:
    """Insert a grant and the authorization code that will start it."""
    session.add(grant)
    await session.flush()
    session.add(code)


async def open_grant(session: AsyncSession, *, grant: OAuthGrant) -> None:
    """Insert a grant issued without a code (client credentials)."""
    session.add(grant)


async def get_grant(session: AsyncSession, *, grant_id: str) -> OAuthGrant | None:
    """Return one grant."""
    return await session.get(OAuthGrant, grant_id)


async def redeem_code(
    session: AsyncSession, *, code_hash: str, client_id: str
) -> Redemption[OAuthCode]:
    """Spend an unexpired code of this client; a spent one reports its grant as replayed."""
    now = utcnow()
    row = await session.scalar(
        update(OAuthCode)
        .where(
            OAuthCode.code_hash == code_hash,
            OAuthCode.client_id == client_id,
            OAuthCode.used_at.is_(None),
            OAuthCode.expires_at > now,
        )
        .values(used_at=now)
        .returning(OAuthCode)
    )
    if row is not None:
        return Redemption(row=row)
    spent = await session.scalar(
        select(OAuthCode.grant_id).where(
            OAuthCode.code_hash == code_hash,
            OAuthCode.client_id == client_id,
            OAuthCode.used_at.is_not(None),
        )
    )
    return Redemption(replayed_grant=spent)


async def save_refresh_token(session: AsyncSession, *, token: OAuthRefreshToken) -> None:
    """Insert a refresh token."""
    session.add(token)


def _live_refresh_token(token_hash: str, client_id: str, now: datetime) -> ColumnElement[bool]:
    live_grants = select(OAuthGrant.id).where(
        OAuthGrant.revoked_at.is_(None), OAuthGrant.expires_at > now
    )
    return and_(
        OAuthRefreshToken.token_hash == token_hash,
        OAuthRefreshToken.client_id == client_id,
        OAuthRefreshToken.used_at.is_(None),
        OAuthRefreshToken.revoked_at.is_(None),
        OAuthRefreshToken.expires_at > now,
        OAuthRefreshToken.grant_id.in_(live_grants),
    )


async def _spent_refresh_grant(
    session: AsyncSession, *, token_hash: str, client_id: str
) -> str | None:
    return await session.scalar(
        select(OAuthRefreshToken.grant_id).where(
            OAuthRefreshToken.token_hash == token_hash,
            OAuthRefreshToken.client_id == client_id,
            OAuthRefreshToken.used_at.is_not(None),
        )
    )


async def find_live_refresh_token(
    session: AsyncSession, *, token_hash: str, client_id: str
) -> Redemption[OAuthRefreshToken]:
    """Look up a live refresh token of this client without spending it.

    A spent one reports its grant as replayed.
    """
    row = await session.scalar(
        select(OAuthRefreshToken).where(_live_refresh_token(token_hash, client_id, utcnow()))
    )
    if row is not None:
        return Redemption(row=row)
    spent = await _spent_refresh_grant(session, token_hash=token_hash, client_id=client_id)
    return Redemption(replayed_grant=spent)


async def replace_refresh_token(
    session: AsyncSession, *, token_hash: str, client_id: str, successor: OAuthRefreshToken
) -> Redemption[OAuthRefreshToken]:
    """Spend a live refresh token and add its successor (in the caller's transaction).

    Nothing is added when the token is no longer live; a spent one reports its grant.
    """
    now = utcnow()
    row = await session.scalar(
        update(OAuthRefreshToken)
        .where(_live_refresh_token(token_hash, client_id, now))
        .values(used_at=now)
        .returning(OAuthRefreshToken)
    )
    if row is None:
        spent = await _spent_refresh_grant(session, token_hash=token_hash, client_id=client_id)
        return Redemption(replayed_grant=spent)
    session.add(successor)
    return Redemption(row=row)


async def find_refresh_token(
    session: AsyncSession, *, token_hash: str
) -> tuple[OAuthRefreshToken, OAuthGrant] | None:
    """Return a refresh token with its grant, whatever their state."""
    row = (
        await session.execute(
            select(OAuthRefreshToken, OAuthGrant)
            .join(OAuthGrant, OAuthGrant.id == OAuthRefreshToken.grant_id)
            .where(OAuthRefreshToken.token_hash == token_hash)
        )
    ).one_or_none()
    return None if row is None else (row[0], row[1])


async def revoke_grant(
    session: AsyncSession, *, grant_id: str, reason: str
) -> tuple[datetime | None, str | None]:
    """Revoke a grant and its refresh tokens; returns when its last token expires, and sub.

    sub is what the grant's tokens carry as their subject: its user, or its client.
    """
    now = utcnow()
    await session.execute(
        update(OAuthGrant)
        .where(OAuthGrant.id == grant_id, OAuthGrant.revoked_at.is_(None))
        .values(revoked_at=now, revoked_reason=reason)
    )
    await session.execute(
        update(OAuthRefreshToken)
        .where(OAuthRefreshToken.grant_id == grant_id, OAuthRefreshToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    row = (
        await session.execute(
            select(OAuthGrant.expires_at, OAuthGrant.user_id, OAuthGrant.client_id).where(
                OAuthGrant.id == grant_id
            )
        )
    ).first()
    if row is None:
        return None, None
    return row.expires_at, grant_subject(row.user_id, row.client_id)


def grant_subject(user_id: uuid.UUID | None, client_id: str) -> str:
    """The sub claim of a grant's tokens: its user's id, or its client's for a client's own."""
    return str(user_id) if user_id else client_id


async def live_grants_of_client(
    session: AsyncSession, *, client_id: str
) -> list[tuple[str, datetime, str]]:
    """Unrevoked, unexpired grants of a client, with their expiry and their tokens' sub."""
    rows = await session.execute(
        select(OAuthGrant.id, OAuthGrant.expires_at, OAuthGrant.user_id).where(
            OAuthGrant.client_id == client_id,
            OAuthGrant.revoked_at.is_(None),
            OAuthGrant.expires_at > utcnow(),
        )
    )
    return [(row.id, row.expires_at, grant_subject(row.user_id, client_id)) for row in rows]


async def purge_expired(session: AsyncSession) -> int:
    """Delete expired codes and expired grants (with their refresh tokens); returns rows."""
    now = utcnow()
    codes = await session.execute(delete(OAuthCode).where(OAuthCode.expires_at <= now))
    grants = await session.execute(delete(OAuthGrant).where(OAuthGrant.expires_at <= now))
    return int(codes.rowcount) + int(grants.rowcount)  # type: ignore[attr-defined]

"""Signing keys of OAuth access tokens."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.store.models import utcnow
from service.store.oauth_models import SigningKey

# Any constant works: it only serialises key creation across workers and CLI runs.
KEY_CREATION_LOCK = 0x617574687376


async def list_keys(session: AsyncSession) -> Sequence[SigningKey]:
    """Every key, newest first."""
    return (
        await session.scalars(select(SigningKey).order_by(SigningKey.activates_at.desc()))
    ).all()


async def lock_key_creation(session: AsyncSession) -> None:
    """Hold a transaction-scoped lock so that two processes never both add a first key."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": KEY_CREATION_LOCK}
        )


async def has_active_key(session: AsyncSession) -> bool:
    """Whether some key not retiring signs now, or takes over when the signing ones retire."""
    horizon = await last_retirement_due(session) or utcnow()
    found = await session.scalar(
        select(SigningKey.kid)
        .where(SigningKey.activates_at <= horizon, SigningKey.retired_at.is_(None))
        .limit(1)
    )
    return found is not None


async def last_retirement_due(session: AsyncSession) -> datetime | None:
    """When the last key that signs now is due to retire, if each of them is."""
    now = utcnow()
    return await session.scalar(
        select(func.max(SigningKey.retired_at)).where(
            SigningKey.activates_at <= now, SigningKey.retired_at > now
        )
    )


async def add_key(
    session: AsyncSession,
    *,
    kid: str,
    alg: str,
    private_key: str,
    public_jwk: dict[str, Any],
    activates_at: datetime,
) -> None:
    """Insert a key (private half already encrypted)."""
    session.add(
        SigningKey(
            kid=kid,
            alg=alg,
            private_key=private_key,
            public_jwk=public_jwk,
            activates_at=activates_at,
        )
    )


async def retire_key(session: AsyncSession, *, kid: str, at: datetime | None = None) -> bool:
    """Stop signing with a key at `at` (default now); it stays published until its tokens expire."""
    result = await session.execute(
        update(SigningKey)
        .where(SigningKey.kid == kid, SigningKey.retired_at.is_(None))
        .values(retired_at=at or utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]

"""Login sessions: sign-in, refresh-token rotation with reuse detection, and sign-out."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from service import metrics
from service.auth.credentials import verify_credentials
from service.auth.passwords import Passwords
from service.auth.tokens import TokenPair, issue_pair
from service.errors import ApiError, unauthorized
from service.events import audit
from service.ids import new_id
from service.store import Store
from service.store import sessions as session_store
from service.store import users as user_store
from service.store.blocklist import BlocklistUnavailable, Entry, Kind
from service.store.throttle import Throttle

LOGIN_FAILED = "The username or password is wrong."


async def login(
    *,
    store: Store,
    passwords: Passwords,
    throttle: Throttle,
    username: str,
    password: str,
    address: str,
) -> TokenPair:
    """Check credentials and open a session; unknown users and bad passwords look alike.

    Failures are counted per account and address (attempts.py): past a limit, 429.
    """
    checked = await verify_credentials(
        store=store,
        passwords=passwords,
        throttle=throttle,
        username=username,
        password=password,
        address=address,
    )
    if checked is None:
        raise ApiError(401, LOGIN_FAILED, headers={"WWW-Authenticate": 'Basic realm="authsvc"'})
    account, verification = checked
    settings = store.settings
    sid = new_id()
    session_expires = int(time.time()) + settings.refresh_token_ttl
    pair = issue_pair(
        user_id=str(account.id),
        username=account.username,
        sid=sid,
        refresh_jti=new_id(),
        session_expires=session_expires,
        access_ttl=settings.access_token_ttl,
        scope=settings.default_scopes,
    )
    async with store.db.session() as session:
        # Checked again under a lock: an account disabled while its password was being
        # checked gets no session, and one disabled later sees this sid revoked.
        if not await user_store.lock_enabled(session, user_id=account.id):
            raise ApiError(401, LOGIN_FAILED, headers={"WWW-Authenticate": 'Basic realm="authsvc"'})
        if verification.new_hash:
            await user_store.set_password_hash(
                session, user_id=account.id, password_hash=verification.new_hash
            )
        await session_store.open_session(
            session,
            sid=sid,
            user_id=account.id,
            refresh_jti=pair.refresh_jti,
            expires_at=datetime.fromtimestamp(session_expires, UTC),
        )
    audit("login", user_id=account.id, sid=sid)
    return pair


async def refresh(*, store: Store, claims: dict[str, object]) -> TokenPair:
    """Rotate: spend the presented refresh token and issue a new pair in the same session.

    A refresh token that is not the session's current one was already spent: someone
    replayed it, so the whole session is revoked.
    """
    sid, presented = str(claims["sid"]), str(claims["jti"])
    next_jti = new_id()
    info = await session_store.rotate(store.db, sid=sid, presented_jti=presented, next_jti=next_jti)
    if info is None:
        audit("refresh_replay", user_id=claims.get("sub"), sid=sid)
        await revoke_session(store=store, sid=sid, reason="refresh-reuse")
        raise unauthorized("The refresh token was already used; the session is revoked.")
    settings = store.settings
    return issue_pair(
        user_id=str(info.user_id),
        username=info.username,
        sid=sid,
        refresh_jti=next_jti,
        session_expires=int(info.expires_at.timestamp()),
        access_ttl=settings.access_token_ttl,
        scope=settings.default_scopes,
    )


async def logout(*, store: Store, user_id: str, sid: str) -> None:
    """End one login session: its access token and its refresh tokens."""
    await _audited(revoke_session(store=store, sid=sid, reason="logout"), "logout", user_id, sid)


async def logout_all(*, store: Store, user_id: str, sid: str) -> None:
    """End every login session of the user, on every device."""
    revocation = revoke_all_sessions(store=store, user_id=user_id, reason="logout-all")
    await _audited(revocation, "logout_all", user_id, sid)


async def _audited(revocation: Awaitable[None], event: str, user_id: str, sid: str) -> None:
    """Await a revocation, then audit it; also when it is only recorded (Redis down, 202)."""
    try:
        await revocation
    except BlocklistUnavailable:
        audit(event, user_id=user_id, sid=sid, pending=True)
        raise
    audit(event, user_id=user_id, sid=sid)


async def revoke_session(*, store: Store, sid: str, reason: str) -> None:
    """Revoke every token of one session, durably and in the blocklist."""
    await store.revoke_session(sid, reason)


async def revoke_all_sessions(*, store: Store, user_id: str, reason: str) -> None:
    """Revoke every token of a user issued up to now, on every device."""
    async with store.revoking() as (session, revocations):
        await end_user_sessions(
            session, revocations, store=store, user_id=uuid.UUID(user_id), reason=reason
        )
        metrics.revoked(reason)


async def end_user_sessions(
    session: AsyncSession,
    revocations: list[Entry],
    *,
    store: Store,
    user_id: uuid.UUID,
    reason: str,
    ahead_ms: int = 0,
) -> None:
    """Within store.revoking(): revoke every session of the user begun up to now.

    ahead_ms moves the cutoff that far past this host's clock, for accounts that may not
    sign in again (disabled, deleted): session ids carry the clock of the host that made
    them, which may run a little ahead of this one.
    """
    cutoff_ms = time.time_ns() // 1_000_000 + ahead_ms
    until = cutoff_ms // 1000 + store.settings.refresh_token_ttl + 1
    await session_store.close_user_sessions(
        session, user_id=user_id, cutoff_ms=cutoff_ms, reason=reason
    )
    # Browser sign-ins up to the end of the cutoff millisecond end as well.
    await user_store.end_sessions_before(
        session, user_id=user_id, cutoff=datetime.fromtimestamp((cutoff_ms + 1) / 1000, UTC)
    )
    revocations.append(
        Entry(kind=Kind.USER, subject=str(user_id), expires_at=until, cutoff_ms=cutoff_ms)
    )

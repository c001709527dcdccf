"""OAuth clients, consents, and the accounts behind browser sign-ins."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Row,
    Table,
    bindparam,
    case,
    delete,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.store.db import Database
from service.store.models import User, utcnow
from service.store.oauth_models import OAuthClient, OAuthConsent
from service.store.users import Account

_CLIENTS = cast(Table, OAuthClient.__table__)
_FIND_CLIENTS = select(_CLIENTS).where(_CLIENTS.c.client_id.in_(bindparam("ids", expanding=True)))


async def find_clients(
    database: Database, *, client_ids: Sequence[str]
) -> dict[str, Row[Any] | None]:
    """The client rows with these ids (None for an unknown one), read in one statement.

    Autocommit (a single SELECT needs no BEGIN and COMMIT round trips) and built once: it
    runs on every token request.
    """
    found: dict[str, Row[Any] | None] = dict.fromkeys(client_ids)
    async with database.statement() as connection:
        for row in await connection.execute(_FIND_CLIENTS, {"ids": list(client_ids)}):
            found[row.client_id] = row
    return found


async def create_client(
    session: AsyncSession,
    *,
    client_id: str,
    secret_hash: str | None,
    name: str,
    redirect_uris: list[str],
    grant_types: list[str],
    scope: str,
    auth_method: str,
    resource_server: bool = False,
) -> OAuthClient:
    """Insert a client."""
    client = OAuthClient(
        client_id=client_id,
        secret_hash=secret_hash,
        name=name,
        redirect_uris=redirect_uris,
        grant_types=grant_types,
        scope=scope,
        auth_method=auth_method,
        resource_server=resource_server,
    )
    session.add(client)
    await session.flush()
    return client


async def get_client(session: AsyncSession, *, client_id: str) -> OAuthClient | None:
    """Return one client, or None."""
    return await session.get(OAuthClient, client_id)


async def list_clients(session: AsyncSession) -> Sequence[OAuthClient]:
    """Return every client, oldest first."""
    return (await session.scalars(select(OAuthClient).order_by(OAuthClient.created_at))).all()


async def set_secret_hash(session: AsyncSession, *, client_id: str, secret_hash: str) -> bool:
    """Replace a client's secret digest; False if there is no such client."""
    result = await session.execute(
        update(OAuthClient)
        .where(OAuthClient.client_id == client_id)
        .values(secret_hash=secret_hash, secret_rotated_at=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def delete_client(session: AsyncSession, *, client_id: str) -> bool:
    """Delete a client with its grants, codes, tokens and consents."""
    result = await session.execute(delete(OAuthClient).where(OAuthClient.client_id == client_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def get_consent(session: AsyncSession, *, user_id: uuid.UUID, client_id: str) -> str | None:
    """Return the scopes the user approved for the client, or None."""
    return await session.scalar(
        select(OAuthConsent.scope).where(
            OAuthConsent.user_id == user_id, OAuthConsent.client_id == client_id
        )
    )


async def save_consent(
    session: AsyncSession, *, user_id: uuid.UUID, client_id: str, scope: str
) -> None:
    """Record (or widen) a user's approval of a client's scopes, in one statement.

    One upsert, so that concurrent approvals merge instead of colliding on the key.
    """
    approved = list(dict.fromkeys(scope.split()))
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = insert(OAuthConsent).values(
        user_id=user_id, client_id=client_id, scope=" ".join(approved), granted_at=utcnow()
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[OAuthConsent.user_id, OAuthConsent.client_id],
            set_={
                "scope": _widened(OAuthConsent.scope, approved),
                "granted_at": statement.excluded.granted_at,
            },
        )
    )


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _widened(current: Any, scopes: list[str]) -> ColumnElement[str]:
    """SQL for current with every scope it lacks appended (space-separated)."""
    padded = literal(" ") + current + literal(" ")
    merged = current
    for scope in scopes:
        pattern = f"% {_escape_like(scope)} %"
        merged = merged + case((padded.like(pattern, escape="\\"), ""), else_=" " + scope)
    return func.trim(merged)


async def find_signed_in_account(
    session: AsyncSession, *, user_id: uuid.UUID, signed_in_at: datetime
) -> Account | None:
    """The account of a browser sign-in, unless gone, disabled or signed out everywhere since.

    Logout-all and password changes move sessions_valid_after; password_changed_at also
    covers changes recorded before that column existed.
    """
    row = (
        await session.execute(
            select(User.id, User.username).where(
                User.id == user_id,
                User.disabled_at.is_(None),
                User.password_changed_at <= signed_in_at,
                or_(User.sessions_valid_after.is_(None), User.sessions_valid_after <= signed_in_at),
            )
        )
    ).one_or_none()
    return None if row is None else Account(id=row.id, username=row.username)

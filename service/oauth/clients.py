"""Clients: registered here (secrets are shown once, stored only as digests) and looked up."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from service.events import audit
from service.oauth.models import Client, digest
from service.oauth.scopes import SCOPES
from service.store import Store
from service.store import oauth as client_store
from service.store import oauth_grants as grant_store
from service.store.blocklist import BlocklistUnavailable, Entry, Kind, keep_nothing
from service.store.db import Database
from service.store.revocation_feed import CLIENT, Subject, clock

GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
LOOPBACK = {"127.0.0.1", "localhost", "[::1]"}
MAX_IDENTIFIER = 128
# A kept client is read again after this long even if no change was announced: the bound
# on a change whose announcement could not reach Redis (see changed()).
KEPT_CLIENT_SECONDS = 5.0

log = logging.getLogger(__name__)


def plausible_identifier(value: object) -> bool:
    """Whether value may name a client or user: short, printable, never NUL or CR/LF.

    Hostile values are refused before any lookup (PostgreSQL rejects NUL in text).
    """
    return isinstance(value, str) and 0 < len(value) <= MAX_IDENTIFIER and value.isprintable()


class InvalidClient(ValueError):
    """The registration request is inconsistent; the message says why."""


@dataclass(frozen=True, slots=True)
class Registered:
    """A client and its secret in clear, which exists only in this object."""

    client: Client
    secret: str | None


def new_client_id() -> str:
    """A random 128-bit client id that no command line mistakes for an option."""
    while True:
        client_id = secrets.token_urlsafe(16)
        if not client_id.startswith("-"):  # 1 in 64 would: `clients show -x...` fails
            return client_id


def _check(
    *,
    redirect_uris: Sequence[str],
    grant_types: Sequence[str],
    scope: str,
    auth_method: str,
    resource_server: bool,
) -> None:
    if auth_method not in AUTH_METHODS:
        raise InvalidClient(f"auth method must be one of {', '.join(AUTH_METHODS)}")
    if unknown := set(grant_types) - set(GRANT_TYPES):
        raise InvalidClient(f"unsupported grant types: {', '.join(sorted(unknown))}")
    if unknown := set(scope.split()) - set(SCOPES):
        raise InvalidClient(f"unknown scopes: {', '.join(sorted(unknown))}")
    if auth_method == "none" and "client_credentials" in grant_types:
        raise InvalidClient("a public client cannot use client_credentials")
    if auth_method == "none" and resource_server:
        raise InvalidClient("a resource server must authenticate: it cannot be public")
    if "authorization_code" in grant_types and not redirect_uris:
        raise InvalidClient("authorization_code needs at least one redirect URI")
    for uri in redirect_uris:
        parts = urlsplit(uri)
        loopback = parts.scheme == "http" and parts.hostname in LOOPBACK
        if parts.fragment or not parts.netloc or not (parts.scheme == "https" or loopback):
            raise InvalidClient(f"redirect URI must be absolute https (or http loopback): {uri}")


async def register_client(
    *,
    database: Database,
    name: str,
    redirect_uris: Sequence[str] = (),
    grant_types: Sequence[str] = ("authorization_code", "refresh_token"),
    scope: str = " ".join(SCOPES),
    auth_method: str = "client_secret_basic",
    resource_server: bool = False,
) -> Registered:
    """Create a client; confidential clients get a 256-bit secret.

    A resource server may introspect every token; other clients only their own.
    """
    _check(
        redirect_uris=redirect_uris,
        grant_types=grant_types,
        scope=scope,
        auth_method=auth_method,
        resource_server=resource_server,
    )
    secret = None if auth_method == "none" else secrets.token_urlsafe(32)
    async with database.session() as session:
        row = await client_store.create_client(
            session,
            client_id=new_client_id(),
            secret_hash=digest(secret) if secret else None,
            name=name,
            redirect_uris=list(redirect_uris),
            grant_types=list(dict.fromkeys(grant_types)),
            scope=" ".join(dict.fromkeys(scope.split())),
            auth_method=auth_method,
            resource_server=resource_server,
        )
    audit("client_created", client_id=row.client_id, auth_method=auth_method)
    return Registered(client=Client.from_row(row), secret=secret)


async def list_clients(*, database: Database) -> list[Client]:
    """Every client."""
    async with database.session() as session:
        return [Client.from_row(row) for row in await client_store.list_clients(session)]


async def get_client(*, database: Database, client_id: str) -> Client | None:
    """One client."""
    async with database.session() as session:
        row = await client_store.get_client(session, client_id=client_id)
    return Client.from_row(row) if row else None


async def find_clients(
    *, database: Database, client_ids: Sequence[str]
) -> dict[str, Client | None]:
    """The clients with these ids (None for an unknown one), read in one statement."""
    rows = await client_store.find_clients(database, client_ids=client_ids)
    return {client_id: Client.from_row(row) if row else None for client_id, row in rows.items()}


@dataclass(frozen=True, slots=True)
class KeptClient:
    """A client as this worker read it, and when."""

    client: Client
    read_at: float


def recall_client(store: Store, client_id: str) -> tuple[Client | None, Callable[[Client], None]]:
    """The client as kept in memory, if no change to it can have been missed; and a keeper.

    Kept like a token's verdict (see revocation_feed.py): a change to the client is
    announced on the revocation feed, and a kept client is used only while the feed proves
    this worker has read every announcement up to the propagation window ago. The keeper
    keeps a client read now unless a change is announced first.
    """
    if not store.loop.in_loop_thread():
        return None, keep_nothing
    kept, keep = store.blocklist.recall(client_subject(client_id))
    found = kept.client if kept and clock() - kept.read_at < KEPT_CLIENT_SECONDS else None
    return found, lambda client: keep(KeptClient(client, clock()))


def client_subject(client_id: str) -> Subject:
    """What an announcement of a change to this client names."""
    return (CLIENT, client_id)


async def changed(store: Store, client_id: str) -> None:
    """Tell every worker the client changed; returns once none uses what it kept of it.

    When Redis cannot take the announcement, the change is saved all the same, and workers
    that kept the client read it again within KEPT_CLIENT_SECONDS: that is logged.
    """
    try:
        await store.blocklist.announce([client_subject(client_id)])
    except BlocklistUnavailable:
        log.warning(
            "client %s changed, but Redis could not announce it: workers may use what they "
            "kept of it for up to %.0f s more",
            client_id,
            KEPT_CLIENT_SECONDS,
        )


async def rotate_secret(*, store: Store, client_id: str) -> str | None:
    """Give a confidential client a new secret (the old one stops working); None if unknown."""
    client = await get_client(database=store.db, client_id=client_id)
    if client is None or client.is_public:
        return None
    secret = secrets.token_urlsafe(32)
    async with store.db.session() as session:
        await client_store.set_secret_hash(session, client_id=client_id, secret_hash=digest(secret))
    audit("client_secret_rotated", client_id=client_id)
    await changed(store, client_id)
    return secret


async def delete_client(*, store: Store, client_id: str) -> bool:
    """Revoke every grant of a client, then delete it with everything issued to it.

    Client-credentials tokens belong to no stored grant: they lapse within the access-token
    lifetime, and the client can no longer get new ones.
    """
    async with store.db.session() as session:
        grants = await grant_store.live_grants_of_client(session, client_id=client_id)
    if grants:
        await store.revoke(
            Entry(
                kind=Kind.SESSION,
                subject=grant_id,
                expires_at=int(expires.timestamp()),
                user=sub,
            )
            for grant_id, expires, sub in grants
        )
    async with store.db.session() as session:
        deleted = await client_store.delete_client(session, client_id=client_id)
    if deleted:
        audit("client_deleted", client_id=client_id, grants_revoked=len(grants))
        await changed(store, client_id)
    return deleted


async def purge_expired(*, database: Database) -> int:
    """Drop expired codes and grants; returns how many rows went."""
    async with database.session() as session:
        return await grant_store.purge_expired(session)

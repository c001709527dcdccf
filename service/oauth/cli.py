"""Command line: `python -m service clients ...` and `python -m service keys ...`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from service.config import Settings
from service.events import audit
from service.loop import WorkerLoop
from service.oauth import clients, keys
from service.oauth.models import Client
from service.store import Store
from service.store import oauth_keys as key_store
from service.store.db import Database
from service.store.migrate import database_errors
from service.store.models import utcnow

Command = Callable[[argparse.Namespace, Database, Settings], Awaitable[int]]


def add_commands(commands: Any) -> None:
    """Add the clients and keys commands to the main parser's subcommands."""
    group = commands.add_parser("clients", help="manage OAuth clients")
    sub = group.add_subparsers(required=True, metavar="ACTION")
    create = _action(sub, "create", "register a client (prints its secret once)", _create)
    create.add_argument("--name", required=True)
    create.add_argument("--redirect-uri", action="append", default=[], dest="redirect_uris")
    create.add_argument("--grant-type", action="append", choices=clients.GRANT_TYPES, dest="grants")
    create.add_argument("--scope", default="profile email")
    create.add_argument("--public", action="store_true", help="no secret (auth method none)")
    create.add_argument("--auth-method", choices=clients.AUTH_METHODS, default=None)
    create.add_argument(
        "--resource-server",
        action="store_true",
        help="may introspect tokens issued to other clients (an API, not an app)",
    )
    _action(sub, "list", "list clients", _list)
    _action(sub, "show", "show one client", _show).add_argument("client_id")
    _action(sub, "rotate-secret", "issue a new secret", _rotate).add_argument("client_id")
    _action(sub, "delete", "delete a client and revoke its grants", _delete).add_argument(
        "client_id"
    )
    _action(sub, "purge-expired", "drop expired codes and grants", _purge)

    group = commands.add_parser("keys", help="manage access-token signing keys")
    sub = group.add_subparsers(required=True, metavar="ACTION")
    _action(sub, "list", "list signing keys", _keys_list)
    rotate = _action(sub, "rotate", "add a new signing key", _keys_rotate)
    rotate.add_argument(
        "--activate-in",
        type=int,
        default=0,
        metavar="SECONDS",
        help=f"publish first, sign later; {keys.RETIRE_DELAY_SECONDS:.0f}+ lets every worker "
        "know the key before any token it signs reaches them",
    )
    _action(sub, "retire", "stop signing with a key", _keys_retire).add_argument("kid")
    _action(sub, "reseal", "seal every key with SECRET_KEY (after changing it)", _keys_reseal)


def _action(sub: Any, name: str, help_text: str, command: Command) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    parser.add_argument("--dev", action="store_true", help="development mode: embedded defaults")
    parser.set_defaults(func=lambda args, settings: asyncio.run(_run(command, args, settings)))
    return parser


async def _run(command: Command, args: argparse.Namespace, settings: Settings) -> int:
    database = Database(settings)
    try:
        with database_errors(settings):
            return await command(args, database, settings)
    finally:
        await database.dispose()


def _describe(client: Client) -> dict[str, object]:
    return {
        "client_id": client.client_id,
        "name": client.name,
        "redirect_uris": list(client.redirect_uris),
        "grant_types": list(client.grant_types),
        "scope": client.scope,
        "token_endpoint_auth_method": client.auth_method,
        "resource_server": client.resource_server,
    }


def _print(value: object) -> None:
    print(json.dumps(value, indent=2))


async def _create(args: argparse.Namespace, database: Database, _s: Settings) -> int:
    method = args.auth_method or ("none" if args.public else "client_secret_basic")
    try:
        registered = await clients.register_client(
            database=database,
            name=args.name,
            redirect_uris=args.redirect_uris,
            grant_types=args.grants or ["authorization_code", "refresh_token"],
            scope=args.scope,
            auth_method=method,
            resource_server=args.resource_server,
        )
    except clients.InvalidClient as exc:
        print(f"invalid client: {exc}", file=sys.stderr)
        return 1
    _print({**_describe(registered.client), "client_secret": registered.secret})
    if registered.secret:
        print("Store the secret now: it is not kept and cannot be shown again.", file=sys.stderr)
    return 0


async def _list(_a: argparse.Namespace, database: Database, _s: Settings) -> int:
    _print([_describe(client) for client in await clients.list_clients(database=database)])
    return 0


async def _show(args: argparse.Namespace, database: Database, _s: Settings) -> int:
    client = await clients.get_client(database=database, client_id=args.client_id)
    if client is None:
        print("no such client", file=sys.stderr)
        return 1
    _print(_describe(client))
    return 0


@asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[Store]:
    """A store for one command (its announcements reach the workers), closed afterwards."""
    store = Store(settings, WorkerLoop())
    try:
        yield store
    finally:
        await store.close()


async def _rotate(args: argparse.Namespace, _d: Database, settings: Settings) -> int:
    async with _store(settings) as store:
        secret = await clients.rotate_secret(store=store, client_id=args.client_id)
    if secret is None:
        print("no such confidential client", file=sys.stderr)
        return 1
    _print({"client_id": args.client_id, "client_secret": secret})
    return 0


async def _delete(args: argparse.Namespace, _d: Database, settings: Settings) -> int:
    async with _store(settings) as store:
        deleted = await clients.delete_client(store=store, client_id=args.client_id)
    if not deleted:
        print("no such client", file=sys.stderr)
        return 1
    print(f"deleted {args.client_id}; its grants are revoked")
    return 0


async def _purge(_a: argparse.Namespace, database: Database, _s: Settings) -> int:
    print(f"purged {await clients.purge_expired(database=database)} expired codes and grants")
    return 0


async def _keys_list(_a: argparse.Namespace, database: Database, _s: Settings) -> int:
    async with database.session() as session:
        rows = await key_store.list_keys(session)
    _print(
        [
            {
                "kid": row.kid,
                "alg": row.alg,
                "created_at": row.created_at.isoformat(),
                "activates_at": row.activates_at.isoformat(),
                "retired_at": row.retired_at.isoformat() if row.retired_at else None,
            }
            for row in rows
        ]
    )
    return 0


async def _keys_rotate(args: argparse.Namespace, database: Database, settings: Settings) -> int:
    activates_at = utcnow() + timedelta(seconds=args.activate_in)
    secret_key = settings.secret_key or ""
    async with database.session() as session:
        # A key sealed with another SECRET_KEY than its neighbours' is one the service
        # cannot use (or they are): refuse rather than add it.
        sealed = await keys.sealed_elsewhere_in_use(session, secret_keys=settings.secret_keys)
        if sealed:
            print(
                f"refused: {keys.SEALED_ELSEWHERE} ({len(sealed)} key(s) in use: "
                f"{', '.join(sealed)}); run this with the service's SECRET_KEY and "
                "SECRET_KEY_FALLBACKS",
                file=sys.stderr,
            )
            return 1
        kid = await keys.create_key(session, secret_key=secret_key, activates_at=activates_at)
    print(f"new signing key {kid}, signing from {activates_at.isoformat()}")
    return 0


async def _keys_retire(args: argparse.Namespace, database: Database, _s: Settings) -> int:
    # Ahead of time: every worker rereads the keys first, so none signs past the moment.
    at = utcnow() + timedelta(seconds=keys.RETIRE_DELAY_SECONDS)
    async with database.session() as session:
        retired = await key_store.retire_key(session, kid=args.kid, at=at)
    if not retired:
        print("no such active key", file=sys.stderr)
        return 1
    audit("key_retired", kid=args.kid, at=at.isoformat())
    print(
        f"retired {args.kid}: it signs nothing from {at.isoformat()} on, "
        "and stays published until its tokens have expired"
    )
    return 0


async def _keys_reseal(_a: argparse.Namespace, database: Database, settings: Settings) -> int:
    async with database.session() as session:
        resealed, unreadable = await keys.reseal_keys(session, secret_keys=settings.secret_keys)
    if unreadable:
        print(
            f"refused: neither SECRET_KEY nor SECRET_KEY_FALLBACKS unseals {len(unreadable)} "
            f"key(s): {', '.join(unreadable)}; nothing changed",
            file=sys.stderr,
        )
        return 1
    print(
        f"resealed {resealed} key(s) with SECRET_KEY; once every worker runs with it, "
        "SECRET_KEY_FALLBACKS can be emptied"
    )
    return 0

"""Command line: `python -m service users list|show|create|disable|enable|delete|...`.

Each command prints one line (list and show print JSON) and exits 0; on an error, one
line on standard error and exit status 1. Passwords are prompted for or read from
standard input, never taken from the command line (where `ps` and shell history show them).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from service.auth import admin
from service.auth.passwords import Passwords
from service.auth.schemas import Email, Password, Username
from service.config import Settings
from service.loop import WorkerLoop
from service.store import Store
from service.store.blocklist import BlocklistUnavailable
from service.store.migrate import database_errors
from service.store.users import Account, EmailTaken, UsernameTaken

Command = Callable[[argparse.Namespace, Store, Passwords], Awaitable[int]]

LIST_LIMIT = 100


class Refused(Exception):
    """The command cannot do what was asked; the message is its one line."""


def add_commands(commands: Any) -> None:
    """Add the users command (and create-user, its older spelling) to the main parser."""
    group = commands.add_parser("users", help="administer accounts")
    sub = group.add_subparsers(required=True, metavar="ACTION")
    listing = _action(sub, "list", "list accounts in username order (JSON)", _list)
    listing.add_argument("--after", metavar="USERNAME", help="start after this username")
    listing.add_argument("--limit", type=int, default=LIST_LIMIT, help="at most this many")
    _user(_action(sub, "show", "show one account (JSON; never its password hash)", _show))
    _create_arguments(
        _action(sub, "create", "create an account (registration open or not)", _create)
    )
    _user(_action(sub, "disable", "refuse its sign-ins and revoke its tokens now", _disable))
    _user(_action(sub, "enable", "let a disabled account sign in again", _enable))
    delete = _user(_action(sub, "delete", "delete it, its sessions and OAuth grants", _delete))
    delete.add_argument("--yes", action="store_true", help="confirm: deleting cannot be undone")
    _user(_action(sub, "revoke-sessions", "revoke every token it holds (logout-all)", _revoke))
    password = _user(_action(sub, "set-password", "set its password; revokes its sessions", _pw))
    _password_stdin(password)
    email = _user(_action(sub, "set-email", "set or remove its email address", _set_email))
    choice = email.add_mutually_exclusive_group(required=True)
    choice.add_argument("email", nargs="?", help="the new address")
    choice.add_argument("--remove", action="store_true", help="remove the address")

    legacy = _action(commands, "create-user", "create an account (same as users create)", _create)
    _create_arguments(legacy)


def _action(sub: Any, name: str, help_text: str, command: Command) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    parser.add_argument("--dev", action="store_true", help="development mode: embedded defaults")
    parser.set_defaults(func=lambda args, settings: _run(command, args, settings))
    return parser


def _user(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("user", help="username (any case) or account id")
    return parser


def _create_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("username")
    parser.add_argument("--email", help="the account's email address")
    _password_stdin(parser)


def _password_stdin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input instead of prompting",
    )


def _run(command: Command, args: argparse.Namespace, settings: Settings) -> int:
    """Run one command's async work to its end: the one place that starts an event loop."""
    return asyncio.run(_with_store(command, args, settings))


async def _with_store(command: Command, args: argparse.Namespace, settings: Settings) -> int:
    store = Store(settings, WorkerLoop())
    passwords = Passwords(settings)
    try:
        with database_errors(settings):
            return await command(args, store, passwords)
    except (admin.NoSuchUser, admin.AmbiguousUser, Refused) as exc:
        print(_refusal(exc), file=sys.stderr)
        return 1
    finally:
        passwords.shutdown()
        await store.close()


def _refusal(exc: Exception) -> str:
    if isinstance(exc, admin.NoSuchUser):
        return f"no such user: {exc}"
    if isinstance(exc, admin.AmbiguousUser):
        return f"{exc} is one account's username and another's id: give the other's username"
    return str(exc)


def _print(value: object) -> None:
    print(json.dumps(value, indent=2))


def _name(account: Account) -> str:
    return f"{account.username} ({account.id})"


def _describe(account: Account) -> dict[str, object]:
    return {
        "id": str(account.id),
        "username": account.username,
        "email": account.email,
        "disabled": account.disabled,
    }


async def _revoking(change: Awaitable[Any], done: str, effect: str) -> int:
    """Await a change that revokes tokens; say so once they are refused everywhere."""
    try:
        await change
    except BlocklistUnavailable:
        print(
            f"{done}, but Redis could not be reached: the revocation is recorded, and the "
            "service's workers put it in force within seconds of reaching Redis",
            file=sys.stderr,
        )
        return 1
    print(f"{done}: {effect}")
    return 0


def _valid(kind: Any, value: object, what: str) -> Any:
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as exc:
        message = str(exc.errors(include_url=False)[0]["msg"]).removeprefix("Value error, ")
        raise Refused(f"invalid {what}: {message}") from None


def _read_password(args: argparse.Namespace) -> str:
    """The new password, from standard input or typed twice at a prompt, checked."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat: ") != password:
            raise Refused("passwords differ")
    return str(_valid(Password, password, "password"))


async def _list(args: argparse.Namespace, store: Store, _p: Passwords) -> int:
    if not 1 <= args.limit <= 10_000:
        raise Refused("--limit is between 1 and 10000")
    accounts = await admin.list_accounts(store=store, after=args.after, limit=args.limit)
    _print([_describe(account) for account in accounts])
    return 0


async def _show(args: argparse.Namespace, store: Store, _p: Passwords) -> int:
    account = await admin.find(store=store, name_or_id=args.user)
    found = await admin.details(store=store, user_id=account.id)
    _print(
        {
            **_describe(found.account),
            "created_at": found.created_at.isoformat(),
            "password_changed_at": found.password_changed_at.isoformat(),
            "disabled_at": found.disabled_at.isoformat() if found.disabled_at else None,
            "open_sessions": found.open_sessions,
            "live_oauth_grants": found.live_oauth_grants,
        }
    )
    return 0


async def _create(args: argparse.Namespace, store: Store, passwords: Passwords) -> int:
    username = str(_valid(Username, args.username, "username"))
    email = None if args.email is None else str(_valid(Email, args.email, "email address"))
    password = _read_password(args)
    try:
        account = await admin.create(
            store=store, passwords=passwords, username=username, password=password, email=email
        )
    except UsernameTaken:
        raise Refused(f"username {username!r} is taken") from None
    except EmailTaken:
        raise Refused("that email address is in use by another account") from None
    print(f"created {_name(account)}")
    return 0


async def _disable(args: argparse.Namespace, store: Store, _p: Passwords) -> int:
    account = await admin.find(store=store, name_or_id=args.user)
    if account.disabled:
        print(f"{_name(account)} is disabled already")
        return 0
    _note_embedded(store)
    return await _revoking(
        admin.disable(store=store, user_id=account.id),
        f"disabled {_name(account)}",
        "it cannot sign in, and its tokens are refused",
    )


async def _enable(args: argparse.Namespace, store: Store, _p: Passwords) -> int:
    account = await admin.find(store=store, name_or_id=args.user)
    if not await admin.enable(store=store, user_id=account.id):
        print(f"{_name(account)} is enabled already")
        return 0
    print(f"enabled {_name(account)}: it can sign in again (its earlier tokens stay revoked)")
    return 0


async def _delete(args: argparse.Namespace, store: Store, _p: Passwords) -> int:
    account = await admin.find(store=store, name_or_id=args.user)
    if not args.yes:
        raise Refused(f"deleting {_name(account)} cannot be undone: add --yes")
    _note_embedded(store)

    async def delete() -> None:
        if not await admin.delete(store=store, user_id=account.id):
            raise admin.NoSuchUser(args.user)

    return await _revoking(
        delete(),
        f"deleted {_name(account)}",
        "its tokens are refused, and its sessions and OAuth grants are gone",
    )


async def _revoke(args: argparse.Namespace, store: Store, _p: Passwords) -> int:
    account = await admin.find(store=store, name_or_id=args.user)
    _note_embedded(store)
    return await _revoking(
        admin.revoke_sessions(store=store, user_id=account.id),
        f"revoked every session of {_name(account)}",
        "its tokens are refused",
    )


async def _pw(args: argparse.Namespace, store: Store, passwords: Passwords) -> int:
    account = await admin.find(store=store, name_or_id=args.user)
    password = _read_password(args)
    _note_embedded(store)

    async def change() -> None:
        if not await admin.set_password(
            store=store, passwords=passwords, user_id=account.id, password=password
        ):
            raise admin.NoSuchUser(args.user)

    return await _revoking(
        change(), f"set the password of {_name(account)}", "its earlier sessions are revoked"
    )


async def _set_email(args: argparse.Namespace, store: Store, _p: Passwords) -> int:
    account = await admin.find(store=store, name_or_id=args.user)
    email = None if args.remove else str(_valid(Email, args.email, "email address"))
    try:
        if not await admin.set_email(store=store, user_id=account.id, email=email):
            raise admin.NoSuchUser(args.user)
    except EmailTaken:
        raise Refused("that email address is in use by another account") from None
    print(
        f"removed the email address of {_name(account)}"
        if email is None
        else f"set the email address of {_name(account)} to {email}"
    )
    return 0


def _note_embedded(store: Store) -> None:
    if store.settings.embedded_blocklist:
        print(
            "note: without REDIS_URL revocations live in the server's memory: "
            "a running development server applies this one when it restarts",
            file=sys.stderr,
        )

"""First-party auth endpoints: thin views over the session and account functions."""

from __future__ import annotations

from collections.abc import Awaitable

from flask import Blueprint, Response, current_app, jsonify, request
from flask_jwt_extended import get_jwt, jwt_required

from service.addresses import client_address
from service.auth import accounts, sessions
from service.auth.jwt import revokes_presented_token
from service.auth.passwords import Passwords
from service.auth.schemas import (
    Credentials,
    EmailChange,
    PasswordChange,
    Registration,
    parse_body,
)
from service.oauth.scopes import first_party_only
from service.store import get_store
from service.store.blocklist import BlocklistUnavailable
from service.store.throttle import get_throttle
from service.store.users import Account

bp = Blueprint("auth", __name__, url_prefix="/auth")

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
PENDING = (
    "The revocation is recorded; it is in force on every worker once the blocklist answers "
    "again, and until then no token is accepted."
)


def _passwords() -> Passwords:
    passwords: Passwords = current_app.extensions["passwords"]
    return passwords


@bp.post("/register")
async def register() -> tuple[dict[str, str | None], int]:
    """Create an account, unless registration is closed."""
    store = get_store()
    accounts.require_open_registration(store.settings)
    body = parse_body(Registration)
    account = await accounts.register(
        store=store,
        passwords=_passwords(),
        username=body.username,
        password=body.password,
        email=body.email,
    )
    return _describe(account), 201


def _describe(account: Account) -> dict[str, str | None]:
    return {"id": str(account.id), "username": account.username, "email": account.email}


@bp.post("/login")
async def login() -> tuple[dict[str, object], int, dict[str, str]]:
    """Exchange credentials for an access and refresh token."""
    body = parse_body(Credentials)
    pair = await sessions.login(
        store=get_store(),
        passwords=_passwords(),
        throttle=get_throttle(),
        username=body.username,
        password=body.password,
        address=client_address(request.environ),
    )
    return pair.as_json(), 200, NO_STORE


@bp.post("/refresh")
@jwt_required(refresh=True)
async def refresh() -> tuple[dict[str, object], int, dict[str, str]]:
    """Spend a refresh token for a new pair."""
    pair = await sessions.refresh(store=get_store(), claims=get_jwt())
    return pair.as_json(), 200, NO_STORE


@bp.post("/logout")
@jwt_required()
@first_party_only
@revokes_presented_token
async def logout() -> Response:
    """Revoke this session: the access token and its refresh tokens."""
    claims = get_jwt()
    return await _revoked(
        sessions.logout(store=get_store(), user_id=claims["sub"], sid=claims["sid"])
    )


@bp.post("/logout-all")
@jwt_required()
@first_party_only
@revokes_presented_token
async def logout_all() -> Response:
    """Revoke every token of this user, on every device."""
    claims = get_jwt()
    return await _revoked(
        sessions.logout_all(store=get_store(), user_id=claims["sub"], sid=claims["sid"])
    )


async def _revoked(revocation: Awaitable[None]) -> Response:
    """204 once the revocation is in force; 202 once it is only recorded (Redis down)."""
    try:
        await revocation
    except BlocklistUnavailable:
        # Recorded in PostgreSQL: the blocklist takes it as soon as Redis answers again,
        # and until then every check fails closed.
        return jsonify(status="recorded", detail=PENDING), 202  # type: ignore[return-value]
    return Response(status=204)


@bp.post("/password")
@jwt_required()
@first_party_only
async def change_password() -> Response:
    """Change the password; every session of the user ends."""
    body = parse_body(PasswordChange)
    claims = get_jwt()
    await accounts.change_password(
        store=get_store(),
        passwords=_passwords(),
        throttle=get_throttle(),
        user_id=claims["sub"],
        username=claims["name"],
        current=body.current_password,
        new=body.new_password,
        address=client_address(request.environ),
    )
    return Response(status=204)


@bp.post("/email")
@jwt_required()
@first_party_only
async def change_email() -> dict[str, str | None]:
    """Set, change or (with null) remove the email address; needs the current password."""
    body = parse_body(EmailChange)
    claims = get_jwt()
    store = get_store()
    await accounts.change_email(
        store=store,
        passwords=_passwords(),
        throttle=get_throttle(),
        user_id=claims["sub"],
        username=claims["name"],
        current=body.current_password,
        email=body.email,
        address=client_address(request.environ),
    )
    return _describe(await accounts.get_account(store=store, user_id=claims["sub"]))


@bp.get("/me")
@jwt_required()
@first_party_only
async def me() -> dict[str, str | None]:
    """The account behind the access token."""
    return _describe(await accounts.get_account(store=get_store(), user_id=get_jwt()["sub"]))

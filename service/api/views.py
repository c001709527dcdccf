"""The sample protected resource: the hot path is the token check, not the view."""

from __future__ import annotations

from flask import Blueprint
from flask_jwt_extended import get_jwt, jwt_required

from service.auth.accounts import get_account
from service.isolation import no_database
from service.oauth.scopes import require_scope
from service.store import get_store

bp = Blueprint("api", __name__, url_prefix="/api")


@bp.get("/hello")
@no_database
@jwt_required()
def hello() -> dict[str, str]:
    """Greet the token's user by name, from the token alone."""
    return {"message": f"Hello, {get_jwt()['name']}!"}


@bp.get("/profile")
@no_database
@jwt_required()
@require_scope("profile")
def profile() -> dict[str, str]:
    """The token's user id and name (scope profile)."""
    claims = get_jwt()
    return {"sub": claims["sub"], "username": claims["name"]}


@bp.get("/email")
@jwt_required()
@require_scope("email")
async def email() -> dict[str, str | None]:
    """The token's user's email address, null if they gave none (scope email)."""
    claims = get_jwt()
    if claims["sub"] == claims.get("client_id"):
        return {"sub": claims["sub"], "email": None}  # a client acting for itself
    account = await get_account(store=get_store(), user_id=claims["sub"])
    return {"sub": claims["sub"], "email": account.email}

"""The sample protected resource: the hot path is the token check, not the view."""

from __future__ import annotations

from flask import Blueprint
from flask_jwt_extended import get_jwt, jwt_required

bp = Blueprint("api", __name__, url_prefix="/api")


@bp.get("/hello")
@jwt_required()
def hello() -> dict[str, str]:
    """Greet the token's user by name, from the token alone."""
    return {"message": f"Hello, {get_jwt()['name']}!"}

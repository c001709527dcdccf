"""Scopes the service knows, and the decorator that guards resources with them."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import current_app
from flask_jwt_extended import get_jwt

from service.errors import ApiError, bearer_challenge

SCOPES = ("profile", "email")

F = TypeVar("F", bound=Callable[..., Any])


def require_scope(*scopes: str) -> Callable[[F], F]:
    """Refuse (403 insufficient_scope) a verified token that lacks any of scopes.

    Stack it under @jwt_required(); it works on sync and async views alike.
    """
    needed = " ".join(scopes)

    def decorator(fn: F) -> F:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            granted = set(str(get_jwt().get("scope", "")).split())
            if not set(scopes) <= granted:
                detail = f"The token lacks the scope {needed}."
                challenge = bearer_challenge("insufficient_scope", detail, scope=needed)
                raise ApiError(403, detail, headers={"WWW-Authenticate": challenge})
            return current_app.ensure_sync(fn)(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


def first_party_only(fn: F) -> F:
    """Refuse (403) OAuth access tokens: account operations belong to the user's own login.

    Stack it under @jwt_required(); a third-party client must not log its user out
    everywhere or change their password.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "client_id" in get_jwt():
            detail = "This endpoint accepts only tokens from the user's own login."
            challenge = bearer_challenge("insufficient_scope", detail)
            raise ApiError(403, detail, headers={"WWW-Authenticate": challenge})
        return current_app.ensure_sync(fn)(*args, **kwargs)

    return wrapper  # type: ignore[return-value]

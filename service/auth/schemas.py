"""Request bodies of the auth endpoints, validated strictly."""

from __future__ import annotations

from typing import Annotated, TypeVar

from flask import request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from werkzeug.exceptions import BadRequest, UnsupportedMediaType

from service.auth.emails import MAX_LENGTH, normalize_email

Username = Annotated[
    str, StringConstraints(min_length=3, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
]
Password = Annotated[str, StringConstraints(min_length=8, max_length=256)]
Email = Annotated[
    str,
    StringConstraints(max_length=MAX_LENGTH),
    AfterValidator(normalize_email),
    Field(json_schema_extra={"format": "email"}),
]

M = TypeVar("M", bound=BaseModel)


class Body(BaseModel):
    """Base for JSON bodies: strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class Credentials(Body):
    """Username and password, for register and login."""

    username: Username
    password: Password


class Registration(Credentials):
    """A new account: username, password and, if the user gives one, an email address."""

    email: Email | None = None


class EmailChange(Body):
    """A new email address (null removes it), confirmed with the current password."""

    email: Email | None
    current_password: Password


class PasswordChange(Body):
    """The current password and its replacement."""

    current_password: Password
    new_password: Password


def parse_body(model: type[M]) -> M:
    """Parse the JSON request body into model: 415 if not JSON, 400 if malformed or invalid."""
    if not request.is_json:
        raise UnsupportedMediaType("The request body must be application/json.")
    try:
        data = request.get_json()
    except RecursionError:
        raise BadRequest("The JSON body is nested too deeply.") from None
    return model.model_validate(data)

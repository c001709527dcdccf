"""One error vocabulary: RFC 9457 problem details, with RFC 6750 challenges on 401/403."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, json
from pydantic import ValidationError
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from service import metrics
from service.store.blocklist import BlocklistUnavailable
from service.store.db import unavailable_reason

PROBLEM_JSON = "application/problem+json"
REALM = "authsvc"

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the client can act on; rendered as problem details."""

    def __init__(
        self,
        status: int,
        detail: str | None = None,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title or HTTPStatus(status).phrase)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers or {}
        self.extra = extra


class ServiceUnavailable(ApiError):
    """A dependency is down: the request did nothing and may be retried."""

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(503, detail, headers={"Retry-After": str(retry_after)})


def bearer_challenge(
    error: str | None = None, description: str | None = None, **params: str
) -> str:
    """Build a WWW-Authenticate header value for the Bearer scheme (RFC 6750 section 3)."""
    parts = [f'realm="{REALM}"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{_quote(description)}"')
    parts.extend(f'{key}="{_quote(value)}"' for key, value in params.items())
    return "Bearer " + ", ".join(parts)


def _quote(value: str) -> str:
    return "".join(ch for ch in value if ch not in '"\\' and 0x20 <= ord(ch) < 0x7F)


def unauthorized(detail: str, error: str | None = "invalid_token") -> ApiError:
    """A 401 whose challenge tells the client what was wrong with its token."""
    return ApiError(
        401,
        detail,
        headers={"WWW-Authenticate": bearer_challenge(error, detail if error else None)},
    )


def problem(
    status: int,
    detail: str | None = None,
    *,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    """Render a problem-details response."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    body.update(extra)
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    response.headers.update(headers or {})
    response.headers["Cache-Control"] = "no-store"
    return response


def init_app(app: Flask) -> None:
    """Turn every error the app can raise into problem details."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return problem(exc.status, exc.detail, title=exc.title, headers=exc.headers, **exc.extra)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        headers = {k: v for k, v in exc.get_headers() if k.lower() in {"allow", "retry-after"}}
        return problem(status, exc.description, headers=headers)

    @app.errorhandler(ValidationError)
    def _validation_error(exc: ValidationError) -> Response:
        errors = [
            {"field": ".".join(str(part) for part in err["loc"]), "message": err["msg"]}
            for err in exc.errors(include_url=False, include_input=False)
        ]
        return problem(400, "The request body is invalid.", errors=errors)

    @app.errorhandler(BlocklistUnavailable)
    def _blocklist_down(exc: BlocklistUnavailable) -> Response:
        log.warning("revocation check unavailable: %s", exc)
        return problem(
            503,
            "Token revocation cannot be checked right now; retry shortly.",
            headers={"Retry-After": "1"},
        )

    @app.errorhandler(DataError)
    def _data_error(exc: DataError) -> Response:
        log.warning("input the database refused: %s", type(exc.orig).__name__)
        return problem(400, "The request contains a value that cannot be stored.")

    @app.errorhandler(PoolTimeout)
    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    @app.errorhandler(ConnectionError)
    @app.errorhandler(TimeoutError)
    def _storage_down(exc: Exception) -> Response:
        return _unavailable(exc)

    @app.errorhandler(DBAPIError)
    def _database_error(exc: DBAPIError) -> Response:
        if unavailable_reason(exc) is not None:
            return _unavailable(exc)
        return _unexpected(exc)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return problem(500, "An unexpected error occurred.")


def _unavailable(exc: Exception) -> Response:
    """503: a backend is down, hung or out of connections; the request may be retried."""
    if isinstance(exc, PoolTimeout):  # raised before any statement: not counted elsewhere
        metrics.database_error("pool_timeout")
    log.warning("storage unavailable: %s", unavailable_reason(exc) or type(exc).__name__)
    return problem(
        503, "A storage backend is unavailable; retry shortly.", headers={"Retry-After": "2"}
    )

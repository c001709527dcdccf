"""The browser side of authorization: who is signed in, CSRF tokens, consent records."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from flask import session

from service.errors import ApiError
from service.events import audit
from service.store import Store
from service.store import oauth as client_store
from service.store.users import Account

USER_KEY = "oauth_user"
SINCE_KEY = "oauth_signed_in_at"
CSRF_KEY = "csrf"
AUTHORIZE_PATH = "/oauth/authorize"

TEMPLATES = Path(__file__).resolve().parent / "templates"
HSTS = "max-age=63072000"


def style_sources(template: Path = TEMPLATES / "base.html") -> str:
    """CSP sources allowing exactly the pages' own inline style sheets, by hash."""
    blocks = re.findall(r"<style>(.*?)</style>", template.read_text(), flags=re.DOTALL)
    digests = (base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() for b in blocks)
    return " ".join(f"'sha256-{digest}'" for digest in digests) or "'none'"


# Pages must not be framed (clickjacking on Approve) nor load anything but their own style.
# No form-action: browsers apply it to the redirect to the client that follows Approve.
PAGE_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; style-src {style_sources()}; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


def signed_in() -> tuple[uuid.UUID, datetime] | None:
    """The user id of the browser session and when they signed in, if someone did."""
    try:
        user_id = uuid.UUID(session[USER_KEY])
        return user_id, datetime.fromtimestamp(float(session[SINCE_KEY]), UTC)
    except (KeyError, TypeError, ValueError):
        return None


def sign_in(account: Account) -> None:
    """Start a fresh browser session for account (a new CSRF token, nothing carried over)."""
    session.clear()
    session[USER_KEY] = str(account.id)
    session[SINCE_KEY] = time.time()
    session[CSRF_KEY] = secrets.token_urlsafe(32)
    audit("login", user_id=account.id, via="authorize_page")


def csrf_token() -> str:
    """The session's CSRF token, created on first use."""
    token = session.get(CSRF_KEY)
    if not token:
        token = session[CSRF_KEY] = secrets.token_urlsafe(32)
    return str(token)


def check_csrf(submitted: str | None) -> None:
    """Refuse a form post whose CSRF token does not match the session's."""
    expected = session.get(CSRF_KEY)
    # Bytes: compare_digest refuses non-ASCII str, and a hostile form may send any.
    if (
        not expected
        or not submitted
        or not hmac.compare_digest(
            str(expected).encode(), submitted.encode("utf-8", "surrogateescape")
        )
    ):
        raise ApiError(400, "The form has expired or was not sent by this site; reload it.")


def safe_next(value: str | None) -> str:
    """Only ever send the browser back to our own authorization endpoint.

    The result is rebuilt from the parsed value, and control characters (a CR/LF would
    split the Location header) make it fall back to the bare endpoint.
    """
    if not value or not value.isprintable():
        return AUTHORIZE_PATH
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or parts.path != AUTHORIZE_PATH:
        return AUTHORIZE_PATH
    return urlunsplit(("", "", AUTHORIZE_PATH, parts.query, ""))


async def find_account(
    *, store: Store, user_id: uuid.UUID, signed_in_at: datetime
) -> Account | None:
    """The account of a browser session; None if it is gone or changed password since."""
    async with store.db.session() as db:
        return await client_store.find_signed_in_account(
            db, user_id=user_id, signed_in_at=signed_in_at
        )


async def has_consent(*, store: Store, user_id: uuid.UUID, client_id: str, scope: str) -> bool:
    """Whether the user already approved every requested scope (at least one) for this client."""
    wanted = set(scope.split())
    if not wanted:
        return False
    async with store.db.session() as db:
        granted = await client_store.get_consent(db, user_id=user_id, client_id=client_id)
    return granted is not None and wanted <= set(granted.split())


async def remember_consent(*, store: Store, user_id: uuid.UUID, client_id: str, scope: str) -> None:
    """Record an approval."""
    async with store.db.session() as db:
        await client_store.save_consent(db, user_id=user_id, client_id=client_id, scope=scope)

"""The memo of verified tokens: a hit skips only the signature check, never expiry or revocation."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import pytest
from flask_jwt_extended import JWTManager, view_decorators

from service import close_app, create_app
from service.auth import verified
from service.auth.jwt import memo_shapes_differ
from service.auth.verified import KeyLoader, Verified, VerifiedTokens
from service.config import Settings
from tests.conftest import Session

KEY = b"k" * 32
NOW = 1_800_000_000.0


def entry(expires_at: float | None = None, key: Any = KEY, **claims: Any) -> Verified:
    """A verified entry, by default valid for another minute."""
    return Verified(
        {"alg": "HS256", "typ": "JWT"},
        {"sub": "someone", **claims},
        key,
        time.time() + 60 if expires_at is None else expires_at,
    )


def returns(key: Any) -> KeyLoader:
    """A key loader that picks key for every token."""
    return lambda _header, _claims: key


def refuses(_header: dict[str, Any], _claims: dict[str, Any]) -> Any:
    """A key loader that knows no key for the token (a removed signing key, say)."""
    raise jwt.InvalidTokenError("unknown signing key")


def frozen_clock(monkeypatch: pytest.MonkeyPatch, now: float) -> None:
    """Make the memo (and only the memo) see a fixed time."""
    monkeypatch.setattr(verified, "time", SimpleNamespace(time=lambda: now))


def test_a_hit_returns_a_copy_of_the_claims() -> None:
    memo = VerifiedTokens(8)
    memo.remember("token", entry(name="alice"))
    claims = memo.lookup("token", returns(KEY))
    assert claims == {"sub": "someone", "name": "alice"}
    assert claims is not None
    claims["name"] = "mallory"
    assert memo.lookup("token", returns(KEY)) == {"sub": "someone", "name": "alice"}


def test_an_equal_key_still_counts_as_the_same() -> None:
    memo = VerifiedTokens(8)
    memo.remember("token", entry())
    assert memo.lookup("token", returns(bytes(bytearray(KEY)))) is not None


def test_the_key_loader_sees_the_verified_header_and_claims() -> None:
    seen: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def recording(header: dict[str, Any], claims: dict[str, Any]) -> Any:
        seen.append((header, claims))
        return KEY

    memo = VerifiedTokens(8)
    memo.remember("token", entry(name="alice"))
    memo.lookup("token", recording)
    assert seen == [({"alg": "HS256", "typ": "JWT"}, {"sub": "someone", "name": "alice"})]


def test_an_unknown_token_is_a_miss() -> None:
    memo = VerifiedTokens(8)
    memo.remember("token", entry())
    assert memo.lookup("another token", returns(KEY)) is None
    assert len(memo) == 1


@pytest.mark.parametrize(("expires_in", "hit"), [(-1.0, False), (0.0, False), (0.001, True)])
def test_expiry_is_checked_as_pyjwt_does(
    monkeypatch: pytest.MonkeyPatch, expires_in: float, hit: bool
) -> None:
    frozen_clock(monkeypatch, NOW)
    memo = VerifiedTokens(8)
    memo.remember("token", entry(expires_at=NOW + expires_in))
    assert (memo.lookup("token", returns(KEY)) is not None) is hit
    assert len(memo) == (1 if hit else 0)


@pytest.mark.parametrize("loader", [returns(b"another key" * 3), refuses], ids=["other", "none"])
def test_a_token_under_another_key_or_none_is_dropped(loader: KeyLoader) -> None:
    memo = VerifiedTokens(8)
    memo.remember("token", entry())
    assert memo.lookup("token", loader) is None
    assert len(memo) == 0
    assert memo.lookup("token", returns(KEY)) is None


def test_the_oldest_entry_goes_beyond_the_size() -> None:
    memo = VerifiedTokens(3)
    for index in range(4):
        memo.remember(f"token {index}", entry(n=index))
    assert len(memo) == 3
    assert memo.lookup("token 0", returns(KEY)) is None
    for index in range(1, 4):
        assert memo.lookup(f"token {index}", returns(KEY)) == {"sub": "someone", "n": index}


def test_the_oldest_entries_go_beyond_the_byte_budget() -> None:
    memo = VerifiedTokens(1_000_000)
    token_bytes = verified.TOKEN_BYTES
    fit = verified.MEMO_BYTES // verified.entry_cost("t" * token_bytes)
    for index in range(fit + 10):
        memo.remember(f"{index:08d}".ljust(token_bytes, "t"), entry(n=index))
    assert len(memo) == fit
    assert memo.peek("00000009".ljust(token_bytes, "t")) is None
    assert memo.peek(f"{fit + 9:08d}".ljust(token_bytes, "t")) == {"sub": "someone", "n": fit + 9}
    memo.remember("x" * (token_bytes + 1), entry())  # too long to keep
    assert memo.peek("x" * (token_bytes + 1)) is None and len(memo) == fit


def test_size_zero_remembers_nothing() -> None:
    memo = VerifiedTokens(0)
    memo.remember("token", entry())
    assert len(memo) == 0
    assert memo.lookup("token", returns(KEY)) is None
    assert memo.peek("token") is None


def test_peek_answers_without_any_check() -> None:
    memo = VerifiedTokens(8)
    memo.remember("token", entry(expires_at=time.time() - 60, key=b"gone", name="alice"))
    assert memo.peek("token") == {"sub": "someone", "name": "alice"}
    assert memo.peek("another token") is None
    assert len(memo) == 1


def test_header_answers_a_copy_without_any_check() -> None:
    memo = VerifiedTokens(8)
    memo.remember("token", entry(expires_at=time.time() - 60, key=b"gone"))
    header = memo.header("token")
    assert header == {"alg": "HS256", "typ": "JWT"}
    assert header is not None
    header["alg"] = "none"
    assert memo.header("token") == {"alg": "HS256", "typ": "JWT"}
    assert memo.header("another token") is None


def full_verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every token Flask-JWT-Extended verifies in full from now on."""
    tokens: list[str] = []
    original = JWTManager._decode_jwt_from_config

    def recording(
        self: JWTManager, encoded_token: str, csrf_value: Any = None, allow_expired: bool = False
    ) -> Any:
        tokens.append(encoded_token)
        return original(self, encoded_token, csrf_value, allow_expired)

    monkeypatch.setattr(JWTManager, "_decode_jwt_from_config", recording)
    return tokens


def tampered(token: str) -> str:
    """The token with the end of its signature changed (not only base64 padding bits)."""
    header, payload, signature = token.split(".")
    ending = "BBBBB" if signature[-5] == "A" else "AAAAA"
    return ".".join([header, payload, signature[:-5] + ending])


def detail(response: httpx.Response) -> str:
    """The detail of a problem response."""
    return str(response.json()["detail"])


async def hello(client: httpx.AsyncClient, token: str) -> httpx.Response:
    """GET the protected resource with token."""
    return await client.get("/api/hello", headers={"Authorization": f"Bearer {token}"})


@pytest.mark.library_change("verified_tokens")
async def test_a_token_is_verified_in_full_once(
    client: httpx.AsyncClient, user: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = full_verifications(monkeypatch)
    for _ in range(3):
        assert (await hello(client, user.access)).status_code == 200
    assert tokens.count(user.access) == 1


async def test_a_logout_ends_a_memoised_token_at_once(
    client: httpx.AsyncClient, user: Session
) -> None:
    for _ in range(2):
        assert (await hello(client, user.access)).status_code == 200
    assert (await client.post("/auth/logout", headers=user.bearer())).status_code == 204
    refused = await hello(client, user.access)
    assert refused.status_code == 401
    assert detail(refused) == "The token has been revoked."
    assert (await client.get("/auth/me", headers=user.bearer())).status_code == 401


async def test_a_tampered_token_is_refused_while_the_original_is_memoised(
    client: httpx.AsyncClient, user: Session
) -> None:
    for _ in range(2):
        assert (await hello(client, user.access)).status_code == 200
    header, _, signature = user.access.split(".")
    claims = jwt.decode(user.access, options={"verify_signature": False})
    other_payload = jwt.encode({**claims, "name": "mallory"}, "x" * 32).split(".")[1]
    for token in (tampered(user.access), f"{header}.{other_payload}.{signature}"):
        refused = await hello(client, token)
        assert refused.status_code == 401
        assert detail(refused).startswith("The token is invalid"), detail(refused)
    assert (await hello(client, user.access)).status_code == 200


async def test_a_memoised_token_is_refused_once_expired(
    client: httpx.AsyncClient, user: Session, settings: Settings
) -> None:
    claims = jwt.decode(user.access, options={"verify_signature": False})
    expires_at = math.ceil(time.time()) + 1
    short = jwt.encode({**claims, "exp": expires_at}, str(settings.jwt_secret), algorithm="HS256")
    for _ in range(2):
        assert (await hello(client, short)).status_code == 200
    await asyncio.sleep(expires_at - time.time() + 0.01)
    refused = await hello(client, short)
    assert refused.status_code == 401
    assert detail(refused) == "The token has expired."


@pytest.mark.library_change("verified_tokens")
def test_the_memo_is_left_out_where_the_library_differs(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert memo_shapes_differ() == []

    def renamed(self: JWTManager, token: str, csrf: Any = None, expired: bool = False) -> Any:
        raise AssertionError("never called")

    monkeypatch.setattr(JWTManager, "_decode_jwt_from_config", renamed)
    monkeypatch.delattr(view_decorators, "get_unverified_jwt_headers")
    assert len(memo_shapes_differ()) == 2
    with caplog.at_level(logging.WARNING, logger="service.auth.jwt"):
        app = create_app(settings)
    try:
        assert "verified_tokens" not in app.extensions  # the library's own decoding runs
        assert "verified-token memo NOT applied" in caplog.text
    finally:
        close_app(app)

"""PyJWT's segment check in C: the same answer as PyJWT's own, for every segment."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt import api_jws
from jwt.exceptions import DecodeError

from service.auth import jwt_segments
from service.auth.jwt_segments import ALPHABET, decode_segment, library_check
from tests.conftest import Session

# Mostly the alphabet and padding, now and then anything else: where the rules bite.
SEGMENT_BYTES = st.one_of(
    st.sampled_from(list(ALPHABET + b"=")),
    st.integers(min_value=0, max_value=255),
)


def answer(check: object, segment: bytes) -> object:
    """What a check gives for a segment: the decoded bytes, or the error's message."""
    try:
        return check(segment, "payload")  # type: ignore[operator]
    except DecodeError as err:
        return ("DecodeError", str(err))


@settings(max_examples=3000, deadline=None)
@given(st.lists(SEGMENT_BYTES, max_size=40).map(bytes))
def test_every_segment_gets_pyjwts_answer(segment: bytes) -> None:
    assert answer(decode_segment, segment) == answer(library_check(), segment)


@pytest.mark.parametrize("segment", jwt_segments.PROBES)
def test_the_start_up_probes_agree(segment: bytes) -> None:
    assert answer(decode_segment, segment) == answer(library_check(), segment)


async def test_a_token_with_a_character_outside_the_alphabet_is_refused(
    client: httpx.AsyncClient, user: Session
) -> None:
    header, payload, signature = user.access.split(".")
    for token in (f"{header}.{payload}!.{signature}", f"{header}.{payload}.{signature}+"):
        refused = await client.get("/api/hello", headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 401, refused.text
        assert refused.headers["content-type"].startswith("application/")
    accepted = await client.get("/api/hello", headers=user.bearer())
    assert accepted.status_code == 200


@pytest.fixture
def pyjwt_only() -> Iterator[None]:
    """PyJWT's own check in place for the test; the change put back afterwards if it was on."""
    was_on = library_check() is not inspect_current()
    jwt_segments.uninstall()
    yield
    if was_on:
        assert jwt_segments.install()


def inspect_current() -> object:
    """The segment check PyJWT calls now."""
    return api_jws.PyJWS._decode_base64url_segment


@pytest.mark.library_change("jwt_segments")
def test_the_change_is_left_out_where_pyjwt_differs(
    pyjwt_only: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert jwt_segments.shapes_differ() == []
    monkeypatch.setattr(api_jws, "_BASE64URL_ALPHABET", ALPHABET + b"+/")
    with caplog.at_level(logging.WARNING, logger="service.auth.jwt_segments"):
        assert not jwt_segments.install()
    assert "jwt_segments NOT applied" in caplog.text
    assert inspect_current() is library_check()  # PyJWT's own check runs
    monkeypatch.undo()
    assert jwt_segments.install()
    assert inspect_current() is decode_segment

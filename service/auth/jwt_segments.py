"""PyJWT's base64url segment check, done in C (the `jwt_segments` library change).

PyJWT 2.15 refuses a token segment with a character outside the base64url alphabet
(GHSA-hxm8-2xgr-2p9m) by testing each byte in a Python generator: about 23 us of a
30 us header parse for a 500-byte token. Flask-JWT-Extended parses a new token four
times, so a refresh or a logout paid about 0.1 ms for it. `bytes.translate` with the
alphabet as the bytes to delete makes the same test in C: the segment is refused when
anything is left. Every other step (padding, length, round trip) is PyJWT's own, in
its order, with its errors.

At start-up the replacement is compared with PyJWT's own on a set of segments, good and
bad; where PyJWT's function or alphabet is not what this replaces, or an answer differs,
the change is left out and PyJWT's own check runs (see shapes_differ).
"""

from __future__ import annotations

import binascii
import inspect
import logging
from collections.abc import Callable
from importlib.metadata import version

from jwt import api_jws
from jwt.exceptions import DecodeError
from jwt.utils import base64url_decode, base64url_encode

log = logging.getLogger(__name__)

ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Segments whose answers (decoded bytes, or the error's message) must agree with PyJWT's.
PROBES = (
    b"",
    b"e30",
    b"e30=",
    b"e30==",
    b"e30===",
    b"eyJhbGciOiJIUzI1NiJ9",
    b"eyJhbGciOiJIUzI1NiJ9=",
    b"QQ",
    b"QR",
    b"QQ==",
    b"QQ=",
    b"Q",
    b"QUJD",
    b"QUJ",
    b"QUJ=",
    b"!!!!",
    b"e30+",
    b"e30/",
    b"e3 0",
    b"e30\n",
    b"=e30",
    b"e3=0",
    "é30".encode(),
    b"\x00e30",
)

_original: Callable[[bytes, str], bytes] | None = None


def decode_segment(segment: bytes, name: str) -> bytes:
    """A token segment decoded, or DecodeError: PyJWT's rules, its alphabet test in C."""
    stripped = segment.rstrip(b"=")
    padding = len(segment) - len(stripped)
    if padding > 2 or (padding and len(segment) % 4 != 0):
        raise DecodeError(f"Invalid {name} padding")
    if len(stripped) % 4 == 1 or stripped.translate(None, ALPHABET):
        raise DecodeError(f"Invalid {name} padding")
    try:
        decoded = base64url_decode(stripped)
    except (TypeError, binascii.Error) as err:
        raise DecodeError(f"Invalid {name} padding") from err
    if base64url_encode(decoded) != stripped:
        raise DecodeError(f"Invalid {name} padding")
    return decoded


def _answer(decode: Callable[[bytes, str], bytes], segment: bytes) -> object:
    try:
        return decode(segment, "header")
    except DecodeError as err:
        return ("DecodeError", str(err))


def shapes_differ() -> list[str]:
    """Where PyJWT differs from what decode_segment replaces (empty: it may be installed)."""
    found = inspect.getattr_static(api_jws.PyJWS, "_decode_base64url_segment", None)
    if not isinstance(found, staticmethod):
        return ["PyJWS._decode_base64url_segment (a staticmethod)"]
    own = library_check()
    if tuple(inspect.signature(own).parameters) != ("segment", "name"):
        return ["PyJWS._decode_base64url_segment(segment, name)"]
    if getattr(api_jws, "_BASE64URL_ALPHABET", None) != ALPHABET:
        return ["jwt.api_jws._BASE64URL_ALPHABET"]
    differing = [p for p in PROBES if _answer(own, p) != _answer(decode_segment, p)]
    if differing:
        return [f"PyJWS._decode_base64url_segment answers {len(differing)} probes differently"]
    return []


def library_check() -> Callable[[bytes, str], bytes]:
    """PyJWT's own segment check, installed or not."""
    if _original is not None:
        return _original
    found = inspect.getattr_static(api_jws.PyJWS, "_decode_base64url_segment")
    own: Callable[[bytes, str], bytes] = found.__func__
    return own


def install() -> bool:
    """Replace PyJWT's segment check (idempotent); False, with a warning, where it differs."""
    global _original
    problems = shapes_differ()
    if problems:
        log.warning(
            "jwt_segments NOT applied: PyJWT %s differs: %s; PyJWT's own check runs",
            version("pyjwt"),
            "; ".join(problems),
        )
        return False
    if _original is None:
        _original = api_jws.PyJWS._decode_base64url_segment
        api_jws.PyJWS._decode_base64url_segment = staticmethod(decode_segment)  # type: ignore[method-assign]
    return True


def uninstall() -> None:
    """Put PyJWT's own check back (tests)."""
    global _original
    if _original is not None:
        api_jws.PyJWS._decode_base64url_segment = staticmethod(_original)  # type: ignore[method-assign, assignment]
        _original = None

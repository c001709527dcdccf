"""Decode each distinct Huffman-coded HTTP/2 header value once per worker.

Clients send `authorization` as a never-indexed literal (RFC 7541, section 7.1.3), so
HPACK's dynamic table never spares the decoding: the pure-Python Huffman decoder ran
on the same Bearer token for every request, about a tenth of an HTTP/2 request's CPU.
Decoding is a pure function of its input, so a bounded memo returns the same bytes (and
invalid input still raises, as exceptions are not cached).
"""

from __future__ import annotations

from functools import lru_cache

import hpack.hpack
from hpack.huffman_table import decode_huffman

MEMO_SIZE = 4096


@lru_cache(maxsize=MEMO_SIZE)
def _decode(data: bytes) -> bytes:
    return decode_huffman(data)


def memo_decode_huffman(data: bytes | bytearray | memoryview | None) -> bytes:
    """hpack's decode_huffman, remembered per distinct input."""
    if not data:
        return b""
    return _decode(bytes(data))


def install() -> None:
    """Make hpack's decoder use the memo (idempotent; per process)."""
    hpack.hpack.decode_huffman = memo_decode_huffman  # type: ignore[attr-defined,assignment]

"""Decode HTTP/2 header blocks a connection repeats once, and Huffman values once per worker.

Clients send `authorization` as a never-indexed literal (RFC 7541, section 7.1.3), so
HPACK's dynamic table never spares the decoding: the pure-Python Huffman decoder ran
on the same Bearer token for every request, about a tenth of an HTTP/2 request's CPU.
Decoding is a pure function of its input, so a bounded memo returns the same bytes (and
invalid input still raises, as exceptions are not cached).

Past its first request, a client's header block is mostly references into the dynamic
table, often byte for byte the same block again; decoding it walked every field in pure
Python (7% of an HTTP/2 request's CPU). A block's headers are a function of its bytes
and the table it is read against, so each connection's decoder remembers a few blocks
that left the table as they found it, and reuses one only while the table is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import hpack.hpack
from hpack.huffman_table import decode_huffman
from hpack.struct import HeaderTuple

MEMO_SIZE = 4096
BLOCKS_PER_CONNECTION = 8
# Bounds on what one kept block may hold, so a connection's memo stays within a few KiB.
BLOCK_BYTES = 4096
BLOCK_FIELDS = 64

_decode_block = hpack.hpack.Decoder.decode


@lru_cache(maxsize=MEMO_SIZE)
def _decode(data: bytes) -> bytes:
    return decode_huffman(data)


def memo_decode_huffman(data: bytes | bytearray | memoryview | None) -> bytes:
    """hpack's decode_huffman, remembered per distinct input."""
    if not data:
        return b""
    return _decode(bytes(data))


def _table_state(decoder: hpack.hpack.Decoder) -> tuple[Any, ...]:
    """What a block's meaning depends on: the dynamic table's entries and the limits.

    Entries are only ever added at the front, as new tuples, and evicted from the back, so
    the same front entry (by identity) and the same count mean the same entries.
    """
    entries = decoder.header_table.dynamic_entries
    return (
        entries[0] if entries else None,
        len(entries),
        decoder.header_table.maxsize,
        decoder.max_allowed_table_size,
        decoder.max_header_list_size,
    )


def _unchanged(before: tuple[Any, ...], after: tuple[Any, ...]) -> bool:
    return before[0] is after[0] and before[1:] == after[1:]


def memo_decode(self: hpack.hpack.Decoder, data: bytes, raw: bool = False) -> Iterable[HeaderTuple]:
    """hpack's Decoder.decode, reusing this connection's earlier read of the same block."""
    key = (bytes(data), raw)
    blocks: dict[tuple[bytes, bool], tuple[tuple[Any, ...], tuple[Any, ...]]]
    blocks = self.__dict__.setdefault("_memo_blocks", {})
    state = _table_state(self)
    known = blocks.get(key)
    if known is not None and _unchanged(known[0], state):
        return list(known[1])
    headers = list(_decode_block(self, data, raw))
    if (
        len(key[0]) <= BLOCK_BYTES
        and len(headers) <= BLOCK_FIELDS
        and _unchanged(state, _table_state(self))
    ):
        if len(blocks) >= BLOCKS_PER_CONNECTION:
            blocks.clear()
        blocks[key] = (state, tuple(headers))
    return headers


def install() -> None:
    """Make hpack's decoder use the memos (idempotent; per process)."""
    hpack.hpack.decode_huffman = memo_decode_huffman  # type: ignore[attr-defined,assignment]
    hpack.hpack.Decoder.decode = memo_decode  # type: ignore[method-assign]

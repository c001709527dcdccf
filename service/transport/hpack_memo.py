"""Decode HTTP/2 header blocks a connection repeats once, and Huffman values once per worker.

Clients send `authorization` as a never-indexed literal (RFC 7541, section 7.1.3), so
HPACK's dynamic table never spares the decoding: the pure-Python Huffman decoder ran
on the same Bearer token for every request, about a tenth of an HTTP/2 request's CPU.
Decoding is a pure function of its input, so a memo returns the same bytes (and invalid
input still raises, as exceptions are not cached).

Past its first request, a client's header block is mostly references into the dynamic
table, often byte for byte the same block again; decoding it walked every field in pure
Python (7% of an HTTP/2 request's CPU). A block's headers are a function of its bytes
and the table it is read against, so each connection's decoder remembers a few blocks
that left the table as they found it, and reuses one only while the table is unchanged.

Clients choose what both memos hold, so both are bounded in bytes (service/transport/
memo.py): a worker keeps at most HUFFMAN_MEMO_BYTES of decoded values, each connection at
most BLOCK_MEMO_BYTES of blocks, and an entry above its limit is decoded every time, as
hpack does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import hpack.hpack
from hpack.huffman_table import decode_huffman
from hpack.struct import HeaderTuple

from service.transport.memo import BoundedMemo, header_bytes
from service.transport.shapes import Shape, differing

HUFFMAN_MEMO_BYTES = 2 * 1024 * 1024  # per worker: ~1,000 remembered Bearer tokens
HUFFMAN_ENTRY_BYTES = 8 * 1024  # a value and its encoding: a large JWT fits
BLOCK_MEMO_BYTES = 32 * 1024  # per connection
BLOCK_ENTRY_BYTES = 8 * 1024  # a block and the headers it decodes to
MEMO = "_memo_blocks"

_decode_block = hpack.hpack.Decoder.decode
_huffman: BoundedMemo[bytes] = BoundedMemo(
    budget=HUFFMAN_MEMO_BYTES, entry_limit=HUFFMAN_ENTRY_BYTES
)


def memo_decode_huffman(data: bytes | bytearray | memoryview | None) -> bytes:
    """hpack's decode_huffman, remembered per distinct input."""
    if not data:
        return b""
    encoded = bytes(data)
    decoded = _huffman.get(encoded)
    if decoded is None:
        decoded = decode_huffman(encoded)
        _huffman.put(encoded, decoded, len(encoded) + len(decoded))
    return decoded


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
    blocks: BoundedMemo[tuple[tuple[Any, ...], tuple[Any, ...]]] | None
    blocks = self.__dict__.get(MEMO)
    if blocks is None:
        blocks = BoundedMemo(budget=BLOCK_MEMO_BYTES, entry_limit=BLOCK_ENTRY_BYTES)
        self.__dict__[MEMO] = blocks
    state = _table_state(self)
    known = blocks.get(key)
    if known is not None and _unchanged(known[0], state):
        return list(known[1])
    headers = list(_decode_block(self, data, raw))
    if len(key[0]) < BLOCK_ENTRY_BYTES and _unchanged(state, _table_state(self)):
        blocks.put(key, (state, tuple(headers)), len(key[0]) + header_bytes(headers))
    return headers


SHAPES = [
    Shape("Decoder.decode", _decode_block, ["self", "data", "raw"], {"max_header_list_size"}),
    Shape(
        "Decoder._decode_literal",
        hpack.hpack.Decoder._decode_literal,
        ["self", "data", "should_index"],
        {"decode_huffman", "header_table"},
    ),
    Shape("decode_huffman", decode_huffman, ["huffman_string"]),
]


def shapes_differ() -> list[str]:
    """What of hpack's internals this change relies on is not as it expects."""
    decoder = hpack.hpack.Decoder()
    table = decoder.__dict__.get("header_table")
    checks = {
        "Decoder.header_table.dynamic_entries": hasattr(table, "dynamic_entries"),
        "Decoder.header_table.maxsize": hasattr(table, "maxsize"),
        "Decoder.max_allowed_table_size": hasattr(decoder, "max_allowed_table_size"),
        "Decoder.max_header_list_size": hasattr(decoder, "max_header_list_size"),
    }
    return differing(SHAPES, checks)


def install() -> None:
    """Make hpack's decoder use the memos (idempotent; per process)."""
    hpack.hpack.decode_huffman = memo_decode_huffman  # type: ignore[attr-defined,assignment]
    hpack.hpack.Decoder.decode = memo_decode  # type: ignore[method-assign]

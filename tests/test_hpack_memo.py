"""The HTTP/2 header decoding memo returns exactly what hpack decodes."""

from __future__ import annotations

import hpack.hpack
import pytest
from hpack.exceptions import HPACKDecodingError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman

from service.transport import hpack_memo


def test_memo_decodes_like_hpack() -> None:
    encoder = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    for value in [b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", b"", b"x" * 300]:
        encoded = encoder.encode(value)
        assert hpack_memo.memo_decode_huffman(encoded) == decode_huffman(encoded) == value
        assert hpack_memo.memo_decode_huffman(memoryview(encoded)) == value


def test_invalid_input_still_raises_every_time() -> None:
    for _ in range(2):
        with pytest.raises(HPACKDecodingError):
            hpack_memo.memo_decode_huffman(b"\xff\xff\xff\xff")


def test_installed_decoder_round_trips_headers() -> None:
    hpack_memo.install()
    assert hpack.hpack.decode_huffman is hpack_memo.memo_decode_huffman  # type: ignore[attr-defined]
    headers = [(":method", "GET"), ("authorization", "Bearer " + "a1b2" * 100)]
    block = hpack.Encoder().encode(headers, huffman=True)
    decoded = hpack.Decoder().decode(block)
    assert [(str(name), str(value)) for name, value in decoded] == headers

"""The HTTP/2 header decoding memo returns exactly what hpack decodes."""

from __future__ import annotations

import hpack.hpack
import pytest
from hpack.exceptions import HPACKDecodingError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman

from service.transport import hpack_memo, memo


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


@pytest.mark.library_change("hpack_memo")
def test_installed_decoder_round_trips_headers() -> None:
    hpack_memo.install()
    assert hpack.hpack.decode_huffman is hpack_memo.memo_decode_huffman  # type: ignore[attr-defined]
    headers = [(":method", "GET"), ("authorization", "Bearer " + "a1b2" * 100)]
    block = hpack.Encoder().encode(headers, huffman=True)
    decoded = hpack.Decoder().decode(block)
    assert [(str(name), str(value)) for name, value in decoded] == headers


def decoder_counting_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[hpack.Decoder, list[bytes]]:
    """A decoder with the block memo, and the blocks it really decoded."""
    reads: list[bytes] = []
    original = hpack_memo._decode_block

    def counting(self: hpack.Decoder, data: bytes, raw: bool = False) -> object:
        reads.append(bytes(data))
        return original(self, data, raw)

    monkeypatch.setattr(hpack_memo, "_decode_block", counting)
    monkeypatch.setattr(hpack.Decoder, "decode", hpack_memo.memo_decode)
    return hpack.Decoder(), reads


def test_a_repeated_block_is_read_once_per_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder, reads = decoder_counting_reads(monkeypatch)
    encoder = hpack.Encoder()
    headers = [(":method", "GET"), (":path", "/api/hello"), ("x-client", "bench")]
    bearer = hpack.HeaderTuple("authorization", "Bearer abc")  # a never-indexed literal
    first = encoder.encode([*headers, hpack.NeverIndexedHeaderTuple(*bearer)])
    again = encoder.encode([*headers, hpack.NeverIndexedHeaderTuple(*bearer)])
    assert first != again  # the first block adds to the table; the next refers to it
    expected = [*headers, ("authorization", "Bearer abc")]
    for block in (first, again, again, again):
        assert [(str(n), str(v)) for n, v in decoder.decode(block)] == expected
    assert reads == [first, again]  # the block that changed the table is never reused
    fresh = hpack.Decoder()
    fresh.decode(first)
    assert decoder.decode(again, raw=True) == fresh.decode(again, raw=True)


def test_a_kept_block_is_read_again_once_the_table_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoder, reads = decoder_counting_reads(monkeypatch)
    newest = b"\xbe"  # indexed field 62: the newest entry of the dynamic table
    encoder = hpack.Encoder()
    decoder.decode(encoder.encode([("x-a", "1")]))
    assert list(decoder.decode(newest)) == [("x-a", "1")]
    assert list(decoder.decode(newest)) == [("x-a", "1")]
    decoder.decode(encoder.encode([("x-b", "2")]))
    assert list(decoder.decode(newest)) == [("x-b", "2")]
    decoder.header_table_size = 0  # the local side shrinks the table: nothing is left
    with pytest.raises(hpack.InvalidTableIndex):
        decoder.decode(newest)
    assert reads.count(newest) == 3


def test_invalid_blocks_raise_every_time_and_the_memo_stays_within_its_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoder, _ = decoder_counting_reads(monkeypatch)
    for _ in range(2):
        with pytest.raises(hpack.InvalidTableIndex):
            decoder.decode(b"\xff\x00")
    encoder = hpack.Encoder()
    for index in range(200):  # distinct blocks of 2-6 KiB that leave the table alone
        value = f"{index:04d}" * (500 + 5 * index % 1000)
        block = encoder.encode([hpack.NeverIndexedHeaderTuple("x-a", value)], huffman=False)
        assert list(decoder.decode(block)) == [("x-a", value)]
        memo = decoder.__dict__[hpack_memo.MEMO]
        assert 0 < memo.used <= hpack_memo.BLOCK_MEMO_BYTES


def test_large_blocks_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder, reads = decoder_counting_reads(monkeypatch)
    many_fields = b"\x82" * (hpack_memo.BLOCK_ENTRY_BYTES // memo.FIELD_OVERHEAD)
    long_value = hpack.Encoder().encode(
        [hpack.NeverIndexedHeaderTuple("cookie", "c" * hpack_memo.BLOCK_ENTRY_BYTES)],
        huffman=False,
    )
    for block in (many_fields, many_fields, long_value, long_value):
        decoder.decode(block)
    assert reads == [many_fields, many_fields, long_value, long_value]
    assert len(decoder.__dict__[hpack_memo.MEMO]) == 0


FIVE_BITS = b"012aceiost"  # characters with 5-bit codes: 8 of them make 5 whole bytes


def five_bit_value(number: int, units: int) -> tuple[bytes, bytes]:
    """A value distinct per number, and its Huffman encoding (made fast: units align)."""
    encoder = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    unique = bytes(FIVE_BITS[number // 10**place % 10] for place in range(8))
    filler = b"ace01sto"
    value = unique + filler * units
    return value, encoder.encode(unique) + encoder.encode(filler) * units


def test_distinct_huffman_values_stay_within_the_worker_budget() -> None:
    kept = hpack_memo._huffman
    kept.clear()
    for number in range(1000):  # 2-4 KiB each, with their encodings: twice the budget
        value, encoded = five_bit_value(number, 256 + number % 256)
        assert hpack_memo.memo_decode_huffman(encoded) == value
        assert kept.used <= hpack_memo.HUFFMAN_MEMO_BYTES
    assert kept.used > hpack_memo.HUFFMAN_MEMO_BYTES - hpack_memo.HUFFMAN_ENTRY_BYTES
    huge, encoded = five_bit_value(1000, hpack_memo.HUFFMAN_ENTRY_BYTES // 8)
    assert hpack_memo.memo_decode_huffman(encoded) == huge
    assert kept.get(encoded) is None  # decoded, not kept

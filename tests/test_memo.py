"""The byte-bounded memo: what it keeps stays within its budget, oldest out first."""

from __future__ import annotations

from service.transport.memo import ENTRY_OVERHEAD, FIELD_OVERHEAD, BoundedMemo, header_bytes


def test_entries_are_charged_their_bytes_and_the_oldest_leave_first() -> None:
    memo: BoundedMemo[bytes] = BoundedMemo(budget=3 * (100 + ENTRY_OVERHEAD), entry_limit=1000)
    for key in (b"a", b"b", b"c"):
        memo.put(key, key * 99, 100)
    assert [memo.get(key) for key in (b"a", b"b", b"c")] == [b"a" * 99, b"b" * 99, b"c" * 99]
    assert memo.used == memo.budget
    memo.put(b"d", b"d", 100)
    assert memo.get(b"a") is None and memo.get(b"d") == b"d"
    assert memo.used == memo.budget and len(memo) == 3


def test_a_large_entry_is_not_kept_and_replaces_nothing() -> None:
    memo: BoundedMemo[str] = BoundedMemo(budget=10_000, entry_limit=500)
    memo.put("small", "x", 10)
    memo.put("large", "y", 500)
    assert memo.get("large") is None and memo.get("small") == "x"
    assert memo.used == 10 + ENTRY_OVERHEAD


def test_a_key_put_again_is_charged_once() -> None:
    memo: BoundedMemo[int] = BoundedMemo(budget=10_000, entry_limit=5000)
    memo.put("k", 1, 100)
    memo.put("k", 2, 300)
    assert memo.get("k") == 2 and memo.used == 300 + ENTRY_OVERHEAD
    memo.put("k", 3, 6000)  # too large now: the old value goes too
    assert memo.get("k") is None and memo.used == 0


def test_many_distinct_entries_never_exceed_the_budget() -> None:
    memo: BoundedMemo[bytes] = BoundedMemo(budget=64 * 1024, entry_limit=8 * 1024)
    for number in range(2000):
        value = b"%d" % number * (number % 500)
        memo.put(number, value, len(value))
        assert memo.used <= memo.budget
    assert memo.used > memo.budget - memo.entry_limit


def test_a_header_list_is_charged_its_names_values_and_objects() -> None:
    assert header_bytes([(b"a", b"bc"), ("de", "f")]) == 6 + 2 * FIELD_OVERHEAD

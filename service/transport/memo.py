"""A memo bounded in bytes: what a client can fill stays within a fixed budget.

Counting entries bounds nothing when a client chooses their size: 4096 remembered header
values of 60 KiB each are 240 MiB. Each entry here is charged the bytes of its key and
value plus a fixed allowance for the objects that hold them, entries above a size limit
are not kept at all, and the oldest entries leave first once the budget is spent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from hpack.struct import Header

V = TypeVar("V")

# CPython's cost of an entry beyond its bytes: its slot and link, the key and value objects.
ENTRY_OVERHEAD = 256
# ... and of each header in a remembered header list (the tuple and its two strings).
FIELD_OVERHEAD = 128


def header_bytes(headers: Iterable[Header]) -> int:
    """What a header list costs to keep: its names and values, and their objects."""
    return sum(len(name) + len(value) + FIELD_OVERHEAD for name, value in headers)


class BoundedMemo(Generic[V]):
    """Remembered values whose charged bytes stay within `budget`; oldest out first."""

    __slots__ = ("_entries", "budget", "entry_limit", "used")

    def __init__(self, *, budget: int, entry_limit: int) -> None:
        self.budget = budget
        self.entry_limit = entry_limit
        self.used = 0
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> V | None:
        """The value kept for key, if any (TypeError for an unhashable key)."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        """Keep value for key (instead of any before), charged size bytes, if it fits."""
        cost = size + ENTRY_OVERHEAD
        entries = self._entries
        if key in entries:
            self.used -= entries.pop(key)[1]
        if cost > self.entry_limit:
            return
        while entries and self.used + cost > self.budget:
            self.used -= entries.popitem(last=False)[1][1]
        entries[key] = (value, cost)
        self.used += cost

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self.used = 0

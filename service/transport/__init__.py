"""What the service changes in Hypercorn, h2 and hpack: hot-path savings, and an abuse guard.

Every speed-up patches one library internal, keeps the library's behaviour (its tests run
the same exchange against the library's own code where they can), and says in its
docstring what it saves; what clients can fill is bounded in bytes (memo.py). h2_guard
changes HTTP/2 behaviour on purpose, as a security fix; the addresses it cuts off go to
the penalty box (penalty_box.py), which each worker's loop consults at accept
(accept_gate.py, run by service/workers.py rather than installed here). The library
versions are pinned exactly in pyproject.toml; docs/performance.md keeps a record of
each change.

LIBRARY_CHANGES selects the speed-ups (all, none, or some by name); a speed-up whose
library internals are not as it expects (shapes.py) is left out, with one warning for all
of them, and the library's own code runs. The guard is always applied where its own check
passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from service.config import TRANSPORT_CHANGES
from service.transport import (
    coalesce,
    h2_guard,
    h2_headers,
    hpack_memo,
)
from service.transport.shapes import library_versions

log = logging.getLogger(__name__)


class Change(Protocol):
    """A module of this package that changes a library internal for speed."""

    install: Callable[[], None]
    shapes_differ: Callable[[], list[str]]


CHANGES: dict[str, Change] = {
    "hpack_memo": hpack_memo,
    "h2_headers": h2_headers,
    "coalesce": coalesce,
}
assert tuple(CHANGES) == TRANSPORT_CHANGES, "service.config names every change, in order"


def install(changes: Iterable[str] = TRANSPORT_CHANGES) -> list[str]:
    """Apply the speed-ups named and the guard (per process, before Hypercorn serves).

    Idempotent. Returns the speed-ups applied; those whose library internals differ are
    not, and one warning names them.
    """
    wanted = set(changes)
    applied, differ = [], []
    for name, change in CHANGES.items():
        if name not in wanted:
            continue
        problems = change.shapes_differ()
        if problems:
            differ.append(f"{name} ({'; '.join(problems)})")
            continue
        change.install()
        applied.append(name)
    if differ:
        log.warning(
            "library changes NOT applied: library internals differ: %s; %s; "
            "the libraries' own behaviour applies",
            ", ".join(differ),
            library_versions(),
        )
    h2_guard.install()
    return applied

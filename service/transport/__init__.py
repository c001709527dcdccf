"""What the service changes in Hypercorn, h2 and hpack: hot-path savings, and an abuse guard.

Every speed-up patches one library internal, keeps the library's behaviour (its tests run
the same exchange against the library's own code where they can), and says in its
docstring what it saves; what clients can fill is bounded in bytes (memo.py). h2_guard
changes HTTP/2 behaviour on purpose, as a security fix; the addresses it cuts off go to
the penalty box (penalty_box.py), which each worker's loop consults at accept
(accept_gate.py, run by service/workers.py rather than installed here). The library
versions are pinned exactly in pyproject.toml; docs/performance.md keeps a record of
each change.
"""

from __future__ import annotations

from service.transport import (
    coalesce,
    date_header,
    h2_direct,
    h2_guard,
    h2_headers,
    hpack_memo,
    idle_timer,
)


def install() -> None:
    """Apply every change (idempotent; per process, before Hypercorn serves)."""
    hpack_memo.install()
    h2_headers.install()
    date_header.install()
    idle_timer.install()
    coalesce.install()
    h2_direct.install()
    h2_guard.install()

"""Start-up leaves what it built out of later garbage collections (no long loop pauses)."""

from __future__ import annotations

import gc
from typing import Any

from service.adapter import AsgiAdapter


class Warmed:
    """What a start-up hook builds and keeps: a large, cyclic structure."""

    def __init__(self) -> None:
        self.kept: list[Any] = []

    async def build(self) -> None:
        for _ in range(50_000):
            node: dict[str, Any] = {}
            node["self"] = node
            self.kept.append(node)


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("204 No Content", [])
    return []


async def test_full_collections_skip_what_start_up_built() -> None:
    gc.unfreeze()
    warmed = Warmed()
    adapter = AsgiAdapter(app, max_body_bytes=1024, on_startup=warmed.build)
    try:
        await adapter.startup()
        frozen = gc.get_freeze_count()
        assert frozen >= len(warmed.kept)
        # A full collection now walks only what came after start-up.
        gc.collect()
        assert gc.get_freeze_count() == frozen
        assert len(gc.get_objects(generation=2)) < frozen
    finally:
        await adapter.shutdown()
        gc.unfreeze()

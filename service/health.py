"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable

from flask import Blueprint, current_app

from service.isolation import no_database
from service.store import get_store

bp = Blueprint("health", __name__)

PROBE_TIMEOUT = 2.0


@bp.get("/healthz")
@no_database
def healthz() -> dict[str, object]:
    """The process is alive and serving."""
    body: dict[str, object] = {"status": "ok"}
    if current_app.extensions["settings"].expose_worker_id:
        body["worker"] = os.getpid()
    return body


@bp.get("/readyz")
async def readyz() -> tuple[dict[str, object], int]:
    """The database answers, a real revocation check passes and a key may sign; 503 otherwise."""
    store = get_store()
    database, blocklist = await asyncio.gather(_probe(store.db.ping()), _probe(store.probe()))
    keyring = current_app.extensions.get("oauth_keyring")
    # A worker started with the wrong SECRET_KEY stays unready: a rolling update stops there.
    signing = keyring is None or not keyring.sealed_elsewhere()
    ready = database and blocklist and signing
    checks = {
        "database": "ok" if database else "down",
        "blocklist": "ok" if blocklist else "down",
        "signing_keys": "ok" if signing else "unreadable",
    }
    return {"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503


async def _probe(check: Awaitable[object]) -> bool:
    try:
        result = await asyncio.wait_for(check, PROBE_TIMEOUT)
    except Exception:
        return False
    return result is not False

"""Helpers for the blocklist tests: token references, blocklists, durable records."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from service.ids import new_id
from service.store.blocklist import Entry, RedisBlocklist, TokenRef

TIMEOUT = 0.3


def new_ref(now: int | None = None) -> TokenRef:
    """A token of a session that starts now, as the service issues them."""
    now = int(time.time()) if now is None else now
    return TokenRef(jti=new_id(), exp=now + 600, sid=new_id(), sxp=now + 3600, sub=new_id())


def claims_of(ref: TokenRef) -> dict[str, object]:
    """The claims of the token ref stands for."""
    return {"jti": ref.jti, "exp": ref.exp, "sid": ref.sid, "sxp": ref.sxp, "sub": ref.sub}


def make_blocklist(url: str, prefix: str, propagation: float = 0.0) -> RedisBlocklist:
    """A blocklist on url under prefix, with a short timeout (keeping verdicts if asked)."""
    return RedisBlocklist(
        url,
        prefix=prefix,
        shards=4,
        bucket_seconds=60,
        timeout=TIMEOUT,
        max_connections=2,
        propagation=propagation,
    )


async def durable(*entries: Entry) -> AsyncIterator[Entry]:
    """Durable revocations to rebuild from; none only marks the blocklist loaded."""
    for entry in entries:
        yield entry


class RecordUnreadable(Exception):
    """The durable record failed while a load streamed it (PostgreSQL went away, say)."""


async def failing_midway(*entries: Entry) -> AsyncIterator[Entry]:
    """Durable revocations whose stream fails after the entries given."""
    for entry in entries:
        yield entry
    raise RecordUnreadable

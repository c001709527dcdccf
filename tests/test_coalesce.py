"""Coalesced writes keep every byte, in order, through Hypercorn's own server.

Without the change (LIBRARY_CHANGES), the same exchanges check Hypercorn's own writes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.h2_raw import CHUNK, chunked_app, serving


def expected() -> bytes:
    """The body chunked_app sends."""
    return b"".join(b"%d:" % number + CHUNK for number in range(10)) + b"end"


async def test_large_chunked_responses_arrive_whole_and_in_order() -> None:
    async with serving(chunked_app) as url, httpx.AsyncClient() as http:
        replies = await asyncio.gather(*(http.get(url + "/") for _ in range(8)))
    assert all(reply.content == expected() for reply in replies)


async def test_connection_close_still_delivers_the_whole_response() -> None:
    async with serving(chunked_app) as url, httpx.AsyncClient() as http:
        reply = await http.get(url + "/", headers={"connection": "close"})
    assert reply.headers["connection"] == "close"
    assert reply.content == expected()


@pytest.mark.library_change("coalesce")
async def test_a_small_response_leaves_in_one_write(monkeypatch: Any) -> None:
    writes: list[bytes] = []
    original = asyncio.StreamWriter.write

    def counting(self: asyncio.StreamWriter, data: bytes) -> None:
        writes.append(bytes(data))
        original(self, data)

    async with serving(chunked_app) as url, httpx.AsyncClient() as http:
        await http.get(url + "/")  # connect first: only the second request's writes count
        monkeypatch.setattr(asyncio.StreamWriter, "write", counting)
        reply = await http.get(url + "/small")
    assert reply.status_code == 200
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200")
    assert writes[0].endswith(b"\r\nok\r\n0\r\n\r\n")  # head, body and end in one

"""The adapter times out stalled request bodies itself (Hypercorn's read_timeout is off)."""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path
from typing import Any

from service.adapter import AsgiAdapter

REPO = Path(__file__).resolve().parent.parent


def echo_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """A WSGI app answering with the length of the body it got."""
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(len(body)).encode()]


async def call(adapter: AsgiAdapter, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run one request whose body arrives as messages, then nothing more."""
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "http_version": "1.1"}
    incoming = list(messages)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # the client stalls
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(adapter(scope, receive, send), 5)
    return sent


async def test_a_stalled_body_gets_408() -> None:
    adapter = AsgiAdapter(echo_app, max_body_bytes=1024, body_timeout=0.2)
    sent = await call(adapter, [{"type": "http.request", "body": b"ab", "more_body": True}])
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["status"] == 408


async def test_a_body_in_parts_is_read_whole() -> None:
    adapter = AsgiAdapter(echo_app, max_body_bytes=1024, body_timeout=0.2)
    parts = [{"type": "http.request", "body": b"x" * 10, "more_body": True}] * 3
    sent = await call(adapter, [*parts, {"type": "http.request", "body": b"y"}])
    assert (sent[0]["status"], sent[1]["body"]) == (200, b"31")


async def test_a_single_oversized_message_gets_413() -> None:
    adapter = AsgiAdapter(echo_app, max_body_bytes=1024, body_timeout=0.2)
    sent = await call(adapter, [{"type": "http.request", "body": b"z" * 2000}])
    assert sent[0]["status"] == 413


def test_hypercorn_read_timeout_is_left_unset() -> None:
    config = tomllib.loads((REPO / "hypercorn.toml").read_text())
    assert "read_timeout" not in config
    assert config["keep_alive_timeout"] <= 120

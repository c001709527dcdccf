"""LIBRARY_CHANGES picks the speed-ups to library internals; a library not as expected has none."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from service import transport
from service.config import (
    PERFORMANCE_CHANGES,
    TRANSPORT_CHANGES,
    ConfigError,
    Settings,
    load_settings,
)
from service.transport import h2_guard
from tests.servers import ROOT, server_env, start_server, wait_until_listening


def test_the_setting_takes_all_none_or_names(tmp_path: Path) -> None:
    def names(value: str) -> frozenset[str]:
        settings = load_settings(
            service_env="development", instance_dir=tmp_path, library_changes=value
        )
        return settings.library_change_names

    assert names("all") == names("ALL") == frozenset(PERFORMANCE_CHANGES)
    assert names("none") == frozenset()
    assert names(" Coalesce, hpack_memo") == {"coalesce", "hpack_memo"}


@pytest.mark.parametrize("value", ["coalesce,fast", "", "h2_guard"])
def test_anything_else_is_refused_naming_the_changes(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="LIBRARY_CHANGES names unknown changes") as refused:
        load_settings(service_env="development", instance_dir=tmp_path, library_changes=value)
    assert "hpack_memo, h2_headers, coalesce, verified_tokens" in str(refused.value)


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The changes transport.install applies from now on, recorded instead of applied."""
    calls: list[str] = []
    for name in TRANSPORT_CHANGES:
        monkeypatch.setattr(module_of(name), "install", functools.partial(calls.append, name))
    monkeypatch.setattr(h2_guard, "install", functools.partial(calls.append, "h2_guard"))
    return calls


def module_of(name: str) -> Any:
    """The module of service/transport/ that makes a change."""
    return importlib.import_module(f"service.transport.{name}")


def test_install_applies_the_changes_named_and_always_the_guard(installed: list[str]) -> None:
    assert transport.install() == list(TRANSPORT_CHANGES)
    assert installed == [*TRANSPORT_CHANGES, "h2_guard"]
    installed.clear()
    assert transport.install(frozenset()) == []
    assert installed == ["h2_guard"]
    installed.clear()
    assert transport.install({"coalesce", "hpack_memo"}) == ["hpack_memo", "coalesce"]
    assert installed == ["hpack_memo", "coalesce", "h2_guard"]


@pytest.mark.parametrize("name", [*TRANSPORT_CHANGES, "h2_guard"])
def test_each_change_finds_the_pinned_libraries_as_it_expects(name: str) -> None:
    assert module_of(name).shapes_differ() == []


@pytest.mark.parametrize("differ", ["parameters", "names"])
@pytest.mark.parametrize("name", TRANSPORT_CHANGES)
def test_a_library_not_as_expected_leaves_that_change_out_with_one_warning(
    name: str,
    differ: str,
    installed: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    module = module_of(name)
    first, *rest = module.SHAPES
    if differ == "parameters":  # as if a new version had renamed or added a parameter

        def renamed(self: object, other: object) -> None:
            pass

        changed, expected = dataclasses.replace(first, function=renamed), "parameters"
    else:  # as if it no longer called or set what the change relies on
        changed, expected = dataclasses.replace(first, names={"gone"}), "uses ['gone']"
    monkeypatch.setattr(module, "SHAPES", [changed, *rest])
    with caplog.at_level("WARNING", logger=transport.__name__):
        applied = transport.install()
    assert applied == [other for other in TRANSPORT_CHANGES if other != name]
    assert installed == [*applied, "h2_guard"]
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert f"NOT applied: library internals differ: {name} ({first.name}: {expected})" in (
        caplog.text
    )
    assert "hypercorn 0.18.0, h2 4.4.1, hpack 4.2.0" in caplog.text


PATCHED = """
import sys

import h2.stream
import h2.utilities
import hpack.hpack
import hypercorn.asyncio.tcp_server as tcp
from hypercorn.protocol.h2 import H2Protocol

from service import transport
from service.config import parse_library_changes
from service.transport import coalesce, h2_guard, hpack_memo

transport.install(parse_library_changes(sys.argv[1]))
patched = {
    "hpack_memo": hpack.hpack.Decoder.decode is not hpack_memo._decode_block,
    "h2_headers": h2.stream.validate_headers is not h2.utilities.validate_headers,
    "coalesce": tcp.TCPServer.protocol_send is not coalesce._original_send,
    "h2_guard": H2Protocol._handle_events is h2_guard.handle_events,
}
print(",".join(name for name, changed in patched.items() if changed))
"""


@pytest.mark.parametrize(
    ("setting", "changed"),
    [
        ("none", ["h2_guard"]),
        ("coalesce,hpack_memo", ["hpack_memo", "coalesce", "h2_guard"]),
        ("all", [*TRANSPORT_CHANGES, "h2_guard"]),
    ],
)
def test_the_libraries_keep_their_own_code_unless_a_change_is_named(
    setting: str, changed: list[str]
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PATCHED, setting],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert done.stdout.split() == [",".join(changed)], done.stderr


@pytest.mark.parametrize(
    ("setting", "applied", "workers"),
    [
        ("none", "none", 1),
        ("verified_tokens, COALESCE", "coalesce, verified_tokens", 1),
        ("all", ", ".join(PERFORMANCE_CHANGES), 2),
    ],
)
def test_the_setting_reaches_the_workers(
    setting: str, applied: str, workers: int, settings: Settings, tmp_path: Path
) -> None:
    env = server_env(settings, tmp_path) | {"LIBRARY_CHANGES": setting}
    server = start_server(env, workers=workers, log_dir=tmp_path)
    try:
        wait_until_listening(server, workers)
        assert httpx.get(server.url + "/healthz", verify=False).status_code == 200
    finally:
        assert server.stop() == 0
    log = server.log()
    assert "NOT applied" not in log
    # Each worker says what it applied, once, in the order the changes are applied.
    assert re.findall(r"library changes applied: ([a-z0-9_, ]+)", log) == [applied] * workers, log


def test_every_test_through_hypercorn_runs_again_without_the_changes() -> None:
    """scripts/test runs every test module serving through Hypercorn with LIBRARY_CHANGES=none."""
    script = (ROOT / "scripts" / "test").read_text()
    listed = re.search(r"^through_hypercorn=\(([^)]*)\)", script, re.MULTILINE)
    assert listed, "scripts/test lists no through_hypercorn=(...)"
    serving = re.compile(r"\b(start_server|launch_server|serving)\(")
    modules = {
        f"tests/{path.name}"
        for path in (ROOT / "tests").glob("test_*.py")
        if serving.search(path.read_text())
    }
    assert modules <= set(listed.group(1).split())

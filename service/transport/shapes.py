"""Start-up checks that the library internals a change relies on are as it expects.

A change to a library's internals is written against one version (pinned exactly in
pyproject.toml). A different version may rename a parameter, stop calling a helper the
change replaces, or move an attribute: the change would then break requests or silently do
nothing. Each change lists what it relies on, and is applied only where all of it holds.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

LIBRARIES = ("hypercorn", "h2", "hpack", "hyperframe", "priority")


@dataclass(frozen=True)
class Shape:
    """One library function: its parameters, and global or attribute names its code uses."""

    name: str
    function: Callable[..., Any]
    parameters: list[str]
    names: set[str] = field(default_factory=set)


def differing(shapes: Iterable[Shape], checks: Mapping[str, bool] | None = None) -> list[str]:
    """What is not as expected: a shape's name and how it differs, or a failed check's name."""
    differ = []
    for shape in shapes:
        code = getattr(shape.function, "__code__", None)
        try:
            parameters = list(inspect.signature(shape.function).parameters)
        except (TypeError, ValueError):
            parameters = None
        if code is None or parameters != shape.parameters:
            differ.append(f"{shape.name}: parameters")
        elif not shape.names <= set(code.co_names):
            differ.append(f"{shape.name}: uses {sorted(shape.names - set(code.co_names))}")
    return differ + [name for name, holds in (checks or {}).items() if not holds]


def library_versions(names: Iterable[str] = LIBRARIES) -> str:
    """The installed versions of libraries (by default those changed), for a warning."""
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)

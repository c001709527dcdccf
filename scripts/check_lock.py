"""Check that requirements/*.txt still lock what pyproject.toml asks for; run by scripts/test.

Every requirement of pyproject.toml (with its extras, followed through the installed
packages' metadata) must be pinned in its lockfile at a version it allows, and every pinned
package must still be needed. A lockfile that only lacks a tightened bound it already meets
passes: it is still right. bench.txt, whose packages are not installed here, is checked
without their metadata: dev.txt's pins at the same versions, and the bench extra's own
requirements pinned at versions they allow. Run it with the interpreter of an environment
installed from requirements/dev.txt.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)
# What scripts/lock resolves for (uv: --python-version 3.11 --python-platform x86_64-manylinux).
TARGET = default_environment() | {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def pins(lockfile: Path) -> dict[str, Version]:
    """Map each package pinned in lockfile to its version."""
    return {canonicalize_name(n): Version(v) for n, v in PIN.findall(lockfile.read_text())}


def applies(req: Requirement, extra: str = "") -> bool:
    """Whether req is wanted on the lock's target (for the given extra of its parent)."""
    return req.marker is None or req.marker.evaluate(TARGET | {"extra": extra})


def problems(roots: list[Requirement], locked: dict[str, Version]) -> list[str]:
    """What is missing, out of range or no longer needed in a lock for these requirements."""
    found: list[str] = []
    needed: set[str] = set()
    todo = [(req, "pyproject.toml") for req in roots if applies(req)]
    walked: set[tuple[str, str]] = set()
    while todo:
        req, source = todo.pop()
        name = canonicalize_name(req.name)
        needed.add(name)
        if name not in locked:
            found.append(f"{req} (needed by {source}) is not pinned")
            continue
        if not req.specifier.contains(locked[name], prereleases=True):
            found.append(f"{name}=={locked[name]} does not satisfy {req} (needed by {source})")
        for extra in ["", *sorted(req.extras)]:
            if (name, extra) in walked:
                continue
            walked.add((name, extra))
            todo += [(dep, name) for dep in _requires(name, extra, found)]
    found += [f"{name} is pinned but nothing needs it" for name in sorted(set(locked) - needed)]
    return found


def _requires(name: str, extra: str, found: list[str]) -> list[Requirement]:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        found.append(f"{name} is not installed here: install requirements/dev.txt first")
        return []
    deps = [Requirement(line) for line in dist.requires or []]
    if not extra:
        return [dep for dep in deps if applies(dep)]
    # An extra's own requirements: those true with it and false without it.
    return [dep for dep in deps if applies(dep, extra) and not applies(dep)]


def bench_problems(
    bench: list[Requirement], locked: dict[str, Version], dev: dict[str, Version]
) -> list[str]:
    """What bench.txt gets wrong without walking the bench packages (not installed here).

    It is compiled with dev.txt as a constraint: every dev pin at the same version, and
    every bench requirement pinned at a version it allows.
    """
    found = [
        f"{name}=={locked.get(name)} differs from dev.txt's {name}=={version}"
        for name, version in sorted(dev.items())
        if locked.get(name) != version
    ]
    for req in bench:
        name = canonicalize_name(req.name)
        if not applies(req):
            continue
        if name not in locked:
            found.append(f"{req} (the bench extra) is not pinned")
        elif not req.specifier.contains(locked[name], prereleases=True):
            found.append(f"{name}=={locked[name]} does not satisfy {req} (the bench extra)")
    return found


def main() -> int:
    """Check each lockfile against its part of pyproject.toml; print what to do on failure."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = [Requirement(r) for r in project["project"]["dependencies"]]
    dev = runtime + [Requirement(r) for r in project["project"]["optional-dependencies"]["dev"]]
    build = [Requirement(r) for r in project["build-system"]["requires"]]
    failed = False
    bench = [Requirement(r) for r in project["project"]["optional-dependencies"]["bench"]]
    requirements = ROOT / "requirements"
    checks: list[tuple[str, Callable[[dict[str, Version]], list[str]]]] = [
        ("dev.txt", lambda locked: problems(dev, locked)),
        ("runtime.txt", lambda locked: problems(runtime, locked)),
        ("build.txt", lambda locked: problems(build, locked)),
        ("bench.txt", lambda locked: bench_problems(bench, locked, pins(requirements / "dev.txt"))),
    ]
    for lockfile, check in checks:
        path = requirements / lockfile
        found = check(pins(path)) if path.exists() else ["the file is missing"]
        for problem in found:
            print(f"requirements/{lockfile}: {problem}", file=sys.stderr)
        failed = failed or bool(found)
    if failed:
        print(
            "The lockfiles no longer match pyproject.toml's dependencies: run scripts/lock "
            "and commit requirements/ with pyproject.toml.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

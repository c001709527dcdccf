"""scripts/check_lock.py: the committed lockfiles match pyproject.toml, and drift is named."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "scripts" / "check_lock.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _project_with(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the project's pyproject.toml and lockfiles, with one edit to pyproject.toml."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "check_lock.py", tmp_path / "scripts")
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    text = (ROOT / "pyproject.toml").read_text()
    assert old in text
    (tmp_path / "pyproject.toml").write_text(text.replace(old, new, 1))
    return tmp_path


def test_the_committed_lockfiles_match_pyproject() -> None:
    result = _check(ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            '"cryptography>=43",',
            '"cryptography>=43",\n    "tomli-w>=1.0",',
            "requirements/runtime.txt: tomli-w>=1.0 (needed by pyproject.toml) is not pinned",
        ),
        ('"alembic>=1.14"', '"alembic>=999"', "does not satisfy alembic>=999"),
        (
            '"pytest-timeout>=2.3",',
            "",
            "requirements/dev.txt: pytest-timeout is pinned but nothing needs it",
        ),
        ('"pytest>=8.3",', '"pytest[dev]>=8.3",', "(needed by pytest) is not pinned"),
        (
            '"gunicorn[http2]>=27",',
            '"gunicorn[http2]>=27",\n    "tomli-w>=1.0",',
            "requirements/bench.txt: tomli-w>=1.0 (the bench extra) is not pinned",
        ),
    ],
    ids=["new-dependency", "bound-excludes-pin", "removed-dependency", "new-extra", "new-bench"],
)
def test_drift_fails_naming_the_package_and_the_fix(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    result = _check(_project_with(tmp_path, old, new))
    assert result.returncode == 1
    assert expected in result.stderr
    assert "run scripts/lock" in result.stderr

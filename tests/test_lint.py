"""The style gate of the repository, in the default lane: `ruff check` and `ruff format --check` are clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: it is in the `test` extra (pip install -e '.[test]')")
    return [found]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff(args: list[str]) -> None:
    r = subprocess.run([*_ruff(), *args], cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 0, (
        f"ruff {' '.join(args)} found problems (fix: ruff {args[0]} --fix / ruff format):\n{r.stdout}{r.stderr}"
    )

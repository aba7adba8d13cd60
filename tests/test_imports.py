"""Imports run one way: kernels ← engine ← bench, and agentflow imports nothing of this repository.

Every module of the four packages is parsed (not imported) and each import of one of our packages,
at any depth in the file (function-level imports too), is checked against `ALLOWED`. `kernels`
may import only torch, triton and the standard library, and never loads a module a second time.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = ("kernels", "engine", "agentflow", "bench", "tests")
ALLOWED: dict[str, set[str]] = {
    "kernels": {"kernels"},
    "agentflow": {"agentflow"},
    "engine": {"engine", "kernels", "agentflow"},
    "bench": {"bench", "engine", "kernels", "agentflow"},
}
KERNELS_THIRD_PARTY = {"torch", "triton"}


def imported_top_levels(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def violations(root: Path) -> list[str]:
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, top in imported_top_levels(path):
                where = f"{path.relative_to(root)}:{line}"
                if top in OURS and top not in allowed:
                    bad.append(f"{where}: {package} imports {top}")
                if package == "kernels" and top not in OURS:
                    if top not in KERNELS_THIRD_PARTY and top not in sys.stdlib_module_names:
                        bad.append(f"{where}: kernels imports third-party {top}")
                    if top == "importlib":
                        bad.append(f"{where}: kernels loads modules through importlib")
    return sorted(bad)


def test_imports_run_one_way():
    assert violations(REPO) == []


def test_the_check_sees_a_wrong_arrow(tmp_path):
    for package in ALLOWED:
        (tmp_path / package).mkdir()
    (tmp_path / "agentflow" / "bad.py").write_text("def f():\n    from engine.rollout.protocol import RolloutEngine\n")
    (tmp_path / "kernels" / "bad.py").write_text("import numpy\nimport importlib\n")
    (tmp_path / "engine" / "ok.py").write_text("import kernels\nfrom agentflow.lm import LanguageModel\n")
    assert violations(tmp_path) == [
        "agentflow/bad.py:2: agentflow imports engine",
        "kernels/bad.py:1: kernels imports third-party numpy",
        "kernels/bad.py:2: kernels loads modules through importlib",
    ]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_every_package_is_checked(package):
    assert any((REPO / package).rglob("*.py")), f"{package} has no modules: the check would pass vacuously"

"""Code standards as tests: ruff is clean and the layer contracts hold (import-linter)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed; install the test extras: pip install -e '.[test]'")
    return found


def test_ruff_clean() -> None:
    out = subprocess.run(
        [_tool("ruff"), "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_layer_contracts() -> None:
    """supervisor never imports rayserver; the client and procwrap stay off the HTTP layer."""
    out = subprocess.run(
        [_tool("lint-imports")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 3 kept, 0 broken" in out.stdout or "0 broken" in out.stdout, out.stdout


def test_every_module_has_a_docstring() -> None:
    import ast

    missing = []
    for path in list((REPO / "rayserver").rglob("*.py")) + list(
        (REPO / "supervisor").rglob("*.py")
    ):
        tree = ast.parse(path.read_text())
        if not ast.get_docstring(tree):
            missing.append(str(path.relative_to(REPO)))
    assert not missing, f"modules without a docstring: {missing}"


def test_ruff_format_clean() -> None:
    out = subprocess.run(
        [_tool("ruff"), "format", "--check", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


MAX_FUNCTION_LINES = 60


def test_no_function_over_60_lines() -> None:
    """Every function (and method) of rayserver/ and supervisor/ fits in 60 lines, from its
    ``def`` to its last line; a longer one is named with its file, line and length."""
    import ast

    long: list[str] = []
    for path in sorted([*(REPO / "rayserver").rglob("*.py"), *(REPO / "supervisor").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    where = f"{path.relative_to(REPO)}:{node.lineno}"
                    long.append(f"{where} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_internals_names_only_files_that_exist() -> None:
    """docs/internals.md walks a job through the tree: every rayserver/ path it names exists."""
    import re

    text = (REPO / "docs" / "internals.md").read_text()
    named = {m.rstrip("./") for m in re.findall(r"rayserver/[A-Za-z0-9_./-]*", text)}
    assert len(named) > 20, f"docs/internals.md names hardly any files: {sorted(named)}"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"docs/internals.md names files that do not exist: {missing}"

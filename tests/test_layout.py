"""The package's layout stays as README "Layout" describes it (issue "One room per stage").

The import-linter contracts in pyproject.toml (layers, kernels without models, runtime without export)
are checked on the real package and, to show they can fail, on a copy with one backward import added.
File and function sizes are measured with ``ast``.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlsparse"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 450, 80

pytest.importorskip("importlinter", reason="import-linter is part of the dev extra")


def _lint(pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, cwd=pythonpath, env=env, timeout=300)


def test_layers_contract_holds():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "3 kept, 0 broken" in res.stdout


def test_layers_contract_fails_on_a_backward_import(tmp_path):
    copy = tmp_path / "vlsparse"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    mask = copy / "pruning" / "mask.py"
    mask.write_text(mask.read_text() + "\nfrom vlsparse.lottery import runs  # backward: pruning -> lottery\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "vlsparse.pruning.mask -> vlsparse.lottery.runs" in res.stdout


def _python_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_over_450_lines():
    long = {str(f.relative_to(ROOT)): n for f in _python_files() if (n := len(f.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, long


def test_no_function_over_80_lines():
    long = {}
    for f in _python_files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{f.relative_to(ROOT)}:{node.name}"] = n
    assert not long, long

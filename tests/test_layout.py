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
    assert "4 kept, 0 broken" in res.stdout


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


def test_public_api_at_the_top():
    import vlsparse
    from vlsparse.pruning.ticket import Ticket
    from vlsparse.runtime.load import load_sparse
    from vlsparse.runtime.ort import ort_session
    from vlsparse.runtime.pipeline import Pipeline
    from vlsparse.sparse.linear import SparseLinear

    assert set(vlsparse.__all__) == {"Pipeline", "load_sparse", "SparseLinear", "Ticket", "ort_session", "__version__"}
    assert (vlsparse.Pipeline, vlsparse.load_sparse, vlsparse.SparseLinear, vlsparse.Ticket, vlsparse.ort_session) == (
        Pipeline, load_sparse, SparseLinear, Ticket, ort_session)
    with pytest.raises(AttributeError):
        vlsparse.no_such_name


@pytest.mark.parametrize("old, name, new", [
    ("vlsparse.export.model", "load_sparse", "vlsparse.runtime.load"),
    ("vlsparse.export.model", "export_csr", "vlsparse.export.exporters"),
    ("vlsparse.export.onnx_sparse", "ort_session", "vlsparse.runtime.ort"),
    ("vlsparse.data.regions", "extract_regions", "vlsparse.data.visual.regions"),
])
def test_old_import_paths_warn_and_forward(old, name, new):
    import importlib

    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {new}.{name}"):
        obj = getattr(importlib.import_module(old), name)
    assert obj is getattr(importlib.import_module(new), name)


def test_python_dash_m_vlsparse_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "vlsparse", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "find-ticket" in res.stdout and "main-job" in res.stdout

"""Nothing unsafe is loaded: the package's own sources (not the tests) never unpickle, never call
`torch.load` without `weights_only=True`, never trust remote code, never allow pickles in `np.load`,
and never ask transformers for non-safetensors weights.

The check reads the code (Python's ast), not the text, so an error message that says "pickle" to
explain a refusal is fine; importing or calling it is not. A planted sample proves the checker bites.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("models", "export", "quant", "runtime", "benchmarks")  # the subpackages of `vtprune` (pyproject)
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("pd", "read_pickle"), ("pandas", "read_pickle"),
                ("joblib", "load"), ("yaml", "unsafe_load")}


def package_sources() -> list[Path]:
    files = sorted(ROOT.glob("*.py"))
    for d in PACKAGE_DIRS:
        files += sorted(p for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def _keyword(call: ast.Call, name: str):
    """The constant value of keyword `name` in a call; None when absent, ... when not a constant."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else ...
    return None


def _dotted(node: ast.AST) -> tuple[str, ...]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def unsafe_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every unsafe construct in `source`, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name[-2:] in UNSAFE_CALLS:
                found.append(f"{where}: {'.'.join(name)}()")
            if name[-2:] == ("torch", "load") and _keyword(node, "weights_only") is not True:
                found.append(f"{where}: torch.load() without weights_only=True")
            if name[-2:] == ("yaml", "load") and _keyword(node, "Loader") is None and len(node.args) < 2:
                found.append(f"{where}: yaml.load() without a safe Loader")
            if _keyword(node, "trust_remote_code") not in (None, False):
                found.append(f"{where}: trust_remote_code={ast.unparse(next(k.value for k in node.keywords if k.arg == 'trust_remote_code'))}")
            if _keyword(node, "allow_pickle") not in (None, False):
                found.append(f"{where}: allow_pickle not False")
            if name[-1:] == ("from_pretrained",) and _keyword(node, "use_safetensors") not in (None, True):
                found.append(f"{where}: from_pretrained(use_safetensors=...) other than True")
    return found


def test_the_package_has_sources_to_check():
    names = {p.relative_to(ROOT).as_posix() for p in package_sources()}
    assert {"cli.py", "models/loading.py", "runtime/bundle.py", "export/bundle.py"} <= names


@pytest.mark.parametrize("path", package_sources(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_unsafe_loading(path: Path):
    assert unsafe_uses(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix()) == []


def test_weights_are_loaded_from_safetensors_only():
    """The one place weights are read asks transformers for safetensors and no remote code, explicitly."""
    tree = ast.parse((ROOT / "models" / "loading.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _dotted(n.func)[-1:] == ("from_pretrained",)]
    assert calls, "models/loading.py no longer calls from_pretrained: update this test"
    for call in calls:
        assert _keyword(call, "use_safetensors") is True and _keyword(call, "trust_remote_code") is False


def test_the_checker_finds_planted_unsafe_code():
    planted = """
import pickle
from dill import loads
import numpy as np, torch
from transformers import AutoModel
msg = "refusing pickle weights"  # a message is fine
x = pickle.loads(b"")
w = torch.load("w.pt")
w = torch.load("w.pt", weights_only=False)
ok = torch.load("w.pt", weights_only=True)
a = np.load("a.npy", allow_pickle=True)
ok2 = np.load("a.npy", allow_pickle=False)
m = AutoModel.from_pretrained("x", trust_remote_code=True)
m = AutoModel.from_pretrained("x", use_safetensors=False)
"""
    found = unsafe_uses(planted)
    lines = sorted(int(f.split(":")[1]) for f in found)
    assert lines == [2, 3, 7, 8, 9, 11, 13, 14], found

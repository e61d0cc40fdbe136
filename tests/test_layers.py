"""The layers contract (pyproject.toml, [tool.importlinter]), checked on the real import graph by import-linter:
models < export < runtime < quant < benchmarks < the top-level modules (cli.py, cli_run.py, demo.py, ...), and
vtprune.runtime importing neither torch nor transformers, even indirectly or inside a function. Two things a
layers contract cannot say are checked here with grimp (import-linter's graph): every module at the top of the
package sits in some layer (a new one cannot slip past the contract), and the oracle in models/ never imports
the embedded model that was trained with it (models/embedded/).
"""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path

import grimp
from importlinter.cli import lint_imports

import vtprune

PYPROJECT = Path(vtprune.__file__).resolve().parent / "pyproject.toml"


def test_lint_imports_keeps_every_contract(capsys):
    status = lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert status == 0, report
    assert "0 broken" in report, report


def test_every_top_level_module_has_a_layer():
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    declared = {name.strip("() ") for layer in layers for name in layer.replace("|", ":").split(":")}
    found = {f"vtprune.{m.name}" for m in pkgutil.iter_modules(vtprune.__path__)}
    assert found <= declared, f"add {sorted(found - declared)} to a layer of [tool.importlinter] in pyproject.toml"


def test_the_oracle_never_imports_the_embedded_model():
    graph = grimp.build_graph("vtprune", cache_dir=None)
    oracle = sorted(m for m in graph.find_descendants("vtprune.models") if not m.startswith("vtprune.models.embedded"))
    chains = {m: graph.find_shortest_chain(m, "vtprune.models.embedded", as_packages=True) for m in oracle}
    assert not {m: c for m, c in chains.items() if c}, "models/ (the oracle) imports models/embedded/"

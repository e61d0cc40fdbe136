"""No destructive defaults: `train` needs --out, and no command writes inside the installed package (its shipped
model and bundle), whether by default or when pointed there. Each case runs the real CLI in a subprocess and checks
the package's shipped folders byte for byte."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vtprune.cli import build_parser
from vtprune.cli import PACKAGE_ROOT, SHIPPED

CHECKPOINT = PACKAGE_ROOT / "models" / "embedded" / "checkpoint"


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))} if root.exists() else {}


def shipped() -> dict[str, dict]:
    return {s: tree(PACKAGE_ROOT / s) for s in SHIPPED}


def vtprune(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vtprune.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_train_without_out_refuses_at_parse_time(tmp_path):
    before = shipped()
    p = vtprune("train", "--minutes", "0.01", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.splitlines() == [p.stderr.strip()] and p.stderr.startswith("vtprune: error: --out: required")
    assert shipped() == before and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [
    ["train", "--out", CHECKPOINT, "--minutes", "0.01"],
    ["train", "--out", CHECKPOINT / "sub", "--minutes", "0.01"],
    ["train", "--finetune-pruned", "--out", CHECKPOINT, "--minutes", "0.01"],
    ["export", "--out", PACKAGE_ROOT / "models" / "embedded" / "bundle" / "again"],
    ["demo", "--out", CHECKPOINT, "--max-new-tokens", "2"],
    ["eval", "--out", CHECKPOINT, "--limit", "1"],
    ["bench", "--quick", "--out", CHECKPOINT],
    ["triton", "--bundle", CHECKPOINT, "--out", CHECKPOINT / "triton"],
    ["quantize", "--bundle", CHECKPOINT, "--precision", "int8"],
    ["quantize", "--bundle", CHECKPOINT, "--report"],  # the default report folder is <bundle>/report
], ids=lambda a: " ".join(map(str, a[:3])).replace(str(PACKAGE_ROOT), "<pkg>"))
def test_no_command_writes_inside_the_package(argv, tmp_path):
    before = shipped()
    p = vtprune(*argv, cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and "inside the installed vtprune package" in p.stderr, p.stderr
    assert shipped() == before and not list(tmp_path.iterdir())


def test_default_outputs_are_outside_the_package_and_not_the_projects_results():
    """Each default output folder is relative to where the user runs the command, under a folder named for
    vtprune (bench no longer writes into ./benchmarks/results of whatever folder it runs in)."""
    parser = build_parser()
    for argv in (["bench"], ["demo"]):
        out = Path(parser.parse_args(argv).out)
        assert not out.is_absolute() and out.parts[0].startswith("vtprune-"), argv
    assert parser.parse_args(["quantize", "--bundle", "b", "--report"]).out is None  # <bundle>/report, the user's folder
    assert parser.parse_args(["eval"]).out is None  # eval writes nothing unless asked


def test_an_output_of_ones_own_is_accepted(tmp_path):
    from vtprune.cli import check_output

    check_output("--out", tmp_path / "x")
    check_output("--out", PACKAGE_ROOT / "benchmarks" / "results")  # a source checkout: the project's own results
    os.chdir(tmp_path)
    check_output("--out", "vtprune-results/bench")

"""The core install is the runtime: `vtprune run --bundle` (and the demo, on the shipped bundle) must work where
torch, transformers, onnx, matplotlib and rich are not installed. A subprocess blocks them at the import system
(a meta-path finder raising ImportError, as a missing package does) and runs the real CLI; the slow test makes a
fresh virtual environment with only the core dependencies and runs the same commands there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import vtprune

ROOT = Path(vtprune.__file__).resolve().parent
BLOCKED = ("torch", "torchvision", "transformers", "accelerate", "bitsandbytes", "onnx", "onnxscript", "safetensors",
           "matplotlib", "rich", "huggingface_hub")

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {BLOCKED!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not a core dependency)", name=name)
            return None
    sys.meta_path.insert(0, Block())
    from vtprune.cli import main
    code = main(sys.argv[1:])
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
    assert not loaded, loaded
    sys.exit(code)
""")


def without_extras(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER, *map(str, argv)], capture_output=True, text=True, timeout=300)


def test_run_bundle_needs_only_the_core_dependencies(tiny_bundle, tiny_image):
    question = "what is in the image ?"
    human = without_extras("run", "--bundle", tiny_bundle, "--image", tiny_image, "--prompt", question, "--max-new-tokens", "4")
    assert human.returncode == 0 and "Traceback" not in human.stderr, human.stderr[-3000:]
    assert "visual tokens" in human.stderr  # the summary line, after the answer (it used rich: exit 1 here)
    blocked = without_extras("run", "--bundle", tiny_bundle, "--image", tiny_image, "--prompt", question,
                             "--max-new-tokens", "4", "--json")
    assert blocked.returncode == 0, blocked.stderr[-3000:]
    normal = subprocess.run([sys.executable, "-m", "vtprune.cli", "run", "--bundle", str(tiny_bundle), "--image",
                             str(tiny_image), "--prompt", question, "--max-new-tokens", "4", "--json"],
                            capture_output=True, text=True, timeout=300)
    a, b = json.loads(blocked.stdout), json.loads(normal.stdout)
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"] and a["kept_index"] == b["kept_index"]


def test_the_core_dependencies_leave_torch_to_the_export_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in project["dependencies"]}
    assert not core & {"torch", "transformers", "onnx", "onnxscript", "matplotlib", "safetensors"}, core
    assert {"onnxruntime", "numpy", "tokenizers", "pillow"} <= core
    extras = project["optional-dependencies"]
    assert "torch==2.13.0" in extras["export"] and any("export" in d for d in extras["dev"])


@pytest.mark.slow
def test_a_fresh_venv_with_the_core_alone_runs_a_bundle(tiny_bundle, tiny_image, tmp_path):
    """`pip install -e .` in a new venv (packages from the configured index / local wheels) installs no torch,
    and `vtprune run --bundle` answers there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-e", str(ROOT)], check=True, timeout=1200, capture_output=True)
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list"], capture_output=True, text=True).stdout.lower()
    assert "torch" not in listed and "transformers" not in listed and "matplotlib" not in listed, listed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    p = subprocess.run([str(venv / "bin" / "vtprune"), "run", "--bundle", str(tiny_bundle), "--image", str(tiny_image),
                        "--prompt", "what is in the image ?", "--max-new-tokens", "4", "--json"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["visual_tokens_kept"] >= 1


def test_a_command_needing_an_extra_names_it(tmp_path):
    """`vtprune export` without torch: one line naming the extra to install, exit 2, no traceback."""
    p = without_extras("export", "--out", tmp_path / "b")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("vtprune: error: export: needs ") and "vtprune[export]" in line
    assert not list(tmp_path.iterdir())


def test_the_demo_needs_only_the_core_dependencies(tmp_path):
    """The demo answers from the shipped bundle with torch and matplotlib absent (the PNGs are then skipped, said in
    one line), and gives the tokens it gives with everything installed."""
    p = without_extras("demo", "--out", tmp_path / "demo", "--json", "--decode-steps", "4")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert r["kept_patches_png"] is None and "matplotlib" in p.stderr
    full = subprocess.run([sys.executable, "-m", "vtprune.cli", "demo", "--out", str(tmp_path / "full"), "--json",
                           "--decode-steps", "4"], capture_output=True, text=True, timeout=300)
    assert json.loads(full.stdout)["token_ids"] == r["token_ids"] and r["text"] == r["ground_truth"]
    compare = without_extras("demo", "--out", tmp_path / "c", "--compare")
    assert compare.returncode == 2 and compare.stderr.startswith("vtprune: error: --compare") and not compare.stdout
    assert len(compare.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()

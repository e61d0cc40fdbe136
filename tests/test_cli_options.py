"""The command line a new user meets: --version, help text on every option, choices listed where the set is fixed
(and the same set the command reads), option combinations refused at parse time, before anything loads."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import vtprune
from vtprune import cli
from vtprune.benchmarks import hardware, memory
from vtprune.models import shapes


def vtprune_cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vtprune.cli", *map(str, argv)], capture_output=True, text=True, timeout=120)


def test_version():
    p = vtprune_cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"vtprune {vtprune.__version__}"


def test_every_option_of_every_command_has_help():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    missing = [f"{name} {a.option_strings[0]}" for name, p in sub.choices.items() for a in p._actions
               if a.option_strings and a.help in (None, "")]
    assert not missing, missing


def test_the_listed_choices_are_the_tables_the_commands_read():
    from vtprune.quant.quantize import PRECISIONS

    assert cli.HARDWARE == [*hardware.PRESETS, "cpu"] and cli.MODEL_PRESETS == list(shapes.PRESETS)
    assert cli.WEIGHT_PRECISIONS == list(memory.WEIGHT_BITS) and tuple(cli.QUANT_PRECISIONS) == tuple(PRECISIONS)
    for argv in (["roofline", "--help"], ["plan", "--help"]):
        text = vtprune_cli(*argv).stdout
        assert "rtx4090" in text and "h100" in text and "int4" in text, argv
    assert "int8-static" in vtprune_cli("quantize", "--help").stdout


@pytest.mark.parametrize("argv, option, what", [
    (["eval", "--method", "topk"], "--tokens", "fixed number"),
    (["eval", "--method", "visionzip", "--limit", "1"], "--tokens", "fixed number"),
    (["run", "--precision", "int4", "--prompt", "x", "--image", "x.png"], "--precision", "--bundle"),
    (["run", "--provider", "cuda", "--prompt", "x", "--image", "x.png"], "--provider", "--bundle"),
    (["roofline", "--hardware", "abacus"], "--hardware", "invalid choice"),
    (["plan", "--precision", "int3"], "--precision", "invalid choice"),
    (["quantize", "--bundle", "b", "--precision", "int2"], "--precision", "invalid choice"),
])
def test_bad_combinations_fail_before_anything_loads(argv, option, what):
    t0 = time.perf_counter()
    p = vtprune_cli(*argv)
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith(f"vtprune: error: {option}: ") and what in line, line
    assert time.perf_counter() - t0 < 30  # no model, no torch import on this path (11 s of loading before)


def test_hardware_names_are_case_insensitive():
    p = vtprune_cli("plan", "--gpu", "RTX4090", "--json")
    assert p.returncode == 0, p.stderr


def test_run_takes_threads_on_a_bundle(tiny_bundle, tiny_image):
    p = vtprune_cli("run", "--bundle", tiny_bundle, "--image", tiny_image, "--prompt", "what is in the image ?",
                    "--threads", "1", "--max-new-tokens", "2", "--json")
    assert p.returncode == 0, p.stderr

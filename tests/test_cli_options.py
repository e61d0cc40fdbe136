"""The command line a new user meets: --version, help text on every option, choices listed where the set is fixed
(and the same set the command reads), option combinations refused at parse time, before anything loads."""

from __future__ import annotations

import json
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


# ---------------------------------------------------------------- --provider and --threads on eval and quantize --report

def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_cuda_available(), reason="this machine has CUDA: --provider cuda is valid here")
@pytest.mark.parametrize("argv", [
    ["eval", "--provider", "cuda", "--bundle", "no-such-bundle", "--limit", "1"],
    ["quantize", "--bundle", "no-such-bundle", "--report", "--provider", "cuda", "--limit", "1"],
])
def test_an_unavailable_provider_fails_before_anything_loads(argv):
    """The provider is checked before the bundle is opened: the one line names --provider, not the missing folder."""
    t0 = time.perf_counter()
    p = vtprune_cli(*argv)
    took = time.perf_counter() - t0
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("vtprune: error: --provider: cuda is not available here"), line
    assert took < 5, took  # about 0.3 s: python, the parser and onnxruntime's import; nothing of the command


@pytest.mark.parametrize("argv, option, what", [
    (["eval", "--provider", "cpu", "--limit", "1"], "--provider", "--bundle"),
    (["eval", "--bundle", "b", "--threads", "-1"], "--threads", ">= 0"),
    (["quantize", "--bundle", "b", "--precision", "int8", "--provider", "cpu"], "--provider", "--report"),
    (["quantize", "--bundle", "b", "--precision", "int8", "--threads", "2"], "--threads", "--report"),
    (["quantize", "--bundle", "b", "--report", "--threads", "-2"], "--threads", ">= 0"),
])
def test_provider_and_threads_misuse_is_one_line(argv, option, what):
    p = vtprune_cli(*argv)
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith(f"vtprune: error: {option}: ") and what in line, line


@pytest.fixture
def pipelines(monkeypatch):
    """Every Pipeline opened, as (precision, provider, threads); each still runs (the real Pipeline)."""
    from vtprune.runtime import generate

    opened, real = [], generate.Pipeline

    def recording(bundle, precision="fp32", provider=None, threads=0, **kw):
        opened.append((precision, provider, threads))
        return real(bundle, precision, provider, threads, **kw)

    monkeypatch.setattr(generate, "Pipeline", recording)
    return opened


def test_eval_runs_a_bundle_on_the_given_provider_and_threads(tiny_bundle, pipelines, capsys):
    code = cli.main(["eval", "--bundle", str(tiny_bundle), "--provider", "cpu", "--threads", "1", "--limit", "2", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out)["n"] == 2
    assert pipelines == [("fp32", "cpu", 1)]


def test_quantize_report_runs_every_variant_on_the_given_provider_and_threads(tiny_bundle, pipelines, tmp_path, capsys):
    code = cli.main(["quantize", "--bundle", str(tiny_bundle), "--report", "--provider", "cpu", "--threads", "2",
                     "--limit", "1", "--out", str(tmp_path / "report"), "--json"])
    capsys.readouterr()
    assert code == 0
    report = json.loads((tmp_path / "report" / "quantization.json").read_text())
    assert set(pipelines) == {(p, "cpu", 2) for p in report["variants"]}  # the accuracy runs and the decode speed
    assert len(pipelines) == 2 * len(report["variants"])
    assert report["decode_speed_provider"] == "cpu" and report["decode_speed_threads"] == 2
    assert report["decode_speed"].startswith("ONNX Runtime cpu, 2 thread(s)")

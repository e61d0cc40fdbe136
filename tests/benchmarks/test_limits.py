"""Each system's memory is its own, and a system over its limit is stopped and reported, not the machine."""

from __future__ import annotations

import sys

import pytest

from vtprune.benchmarks.limits import run_limited

HOLD = "import sys, time; b = bytearray({mb} * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); time.sleep({s})"


def test_two_processes_of_different_sizes_each_report_their_own_peak():
    big = bytearray(400 * 1024 * 1024)  # the parent holds 400 MB: no child may carry it
    big[::4096] = b"x" * len(big[::4096])
    small = run_limited([sys.executable, "-c", HOLD.format(mb=60, s=1.0)])
    large = run_limited([sys.executable, "-c", HOLD.format(mb=250, s=1.0)])
    del big
    assert small.returncode == 0 and large.returncode == 0
    assert 60 <= small.peak_rss_mb < 60 + 60  # the allocation plus an interpreter
    assert 250 <= large.peak_rss_mb < 250 + 60
    assert not small.out_of_memory and not large.out_of_memory


def test_a_process_over_its_limit_is_killed_and_reported():
    result = run_limited([sys.executable, "-c", HOLD.format(mb=500, s=30)], limit_mb=200)
    assert result.out_of_memory and result.returncode != 0
    assert result.wall_s < 30


@pytest.mark.slow
def test_setup_peer_makes_a_venv_that_imports_genai(tmp_path, monkeypatch):
    """`vtprune bench --setup-peer` (minutes: installs torch and onnxruntime-genai into a fresh venv)."""
    from vtprune.benchmarks import peer

    monkeypatch.setenv("VTPRUNE_GENAI_VENV", str(tmp_path / "venv"))
    result = peer.setup_venv(log=lambda msg: None)
    assert result["onnxruntime_genai"] and peer.find_genai()[0] is not None

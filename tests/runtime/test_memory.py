"""Memory statistics: RSS from the kernel, GPU memory from nvidia-smi (faked here: no GPU on this machine)."""

from __future__ import annotations

import os
import stat

from vtprune.runtime.memory import current_rss_mb, gpu_memory_mb, peak_rss_mb


def test_rss_grows_with_an_allocation():
    before = peak_rss_mb()
    block = bytearray(64 * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    assert peak_rss_mb() >= before and current_rss_mb() >= 64


def test_gpu_memory_reads_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 1234\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert gpu_memory_mb() == 1234.0
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_memory_mb() is None

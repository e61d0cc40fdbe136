"""Run one measured system in a process of its own, under a memory limit, and read its own peak memory.

A peer that runs out of memory (ONNX Runtime GenAI's builder on a 7B model, transformers at fp32) must be
reported as such, not take the machine down: the child's resident memory (its whole process tree) is
polled from /proc and the tree is killed when it passes the limit. The peak reported is the child's own
(VmHWM of each process, RSS summed over the tree), so one system never carries the high-water mark of the
process that started it. Linux only (/proc), like the rest of the bench.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MB = 1024 * 1024


@dataclass
class Limited:
    returncode: int
    peak_rss_mb: float  # the tree's highest summed RSS seen, or the main process's own VmHWM if higher
    out_of_memory: bool  # killed here for passing the limit
    wall_s: float


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree(root: int) -> list[int]:
    """root and its descendants (from /proc/*/stat parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                parents.setdefault(int(fields[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack += parents.get(pid, [])
    return out


def tree_rss_mb(pid: int) -> float:
    return sum(_status_kb(p, "VmRSS") for p in _tree(pid)) / 1024


def run_limited(argv: list[str], limit_mb: float | None = None, poll_s: float = 0.2, **popen) -> Limited:
    """Run argv to completion (or to its memory limit). `popen` goes to subprocess.Popen (stdout, env, ...)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, start_new_session=True, **popen)
    peak, oom = 0.0, False
    while proc.poll() is None:
        rss = tree_rss_mb(proc.pid)
        peak = max(peak, rss, _status_kb(proc.pid, "VmHWM") / 1024)
        if limit_mb is not None and rss > limit_mb:
            oom = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(poll_s)
    return Limited(proc.returncode, round(peak, 1), oom, round(time.perf_counter() - t0, 2))


def default_limit_mb() -> float:
    """What a system may use: the machine's memory less 2 GiB for everything else."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / MB - 2048

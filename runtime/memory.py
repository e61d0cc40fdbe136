"""Resident memory of this process, for the runtime's statistics and the flat-memory check of long generation.

Peak RSS comes from getrusage (ru_maxrss: kilobytes on Linux, bytes on macOS); current RSS from /proc/self/statm
(Linux), or None where that file does not exist.
"""

from __future__ import annotations

import os
import resource
import sys

MB = 1024 * 1024


def peak_rss_mb() -> float:
    """Highest resident set size of this process so far, in MiB."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / MB if sys.platform == "darwin" else maxrss * 1024 / MB


def current_rss_mb() -> float | None:
    """Resident set size now, in MiB (the 2nd field of /proc/self/statm, in pages), or None off Linux."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MB


def gpu_memory_mb() -> float | None:
    """Device memory in use on GPU 0, in MiB, from `nvidia-smi`; None where there is no NVIDIA GPU.

    Read once at the end of a run (after the cache has grown to its budget): ONNX Runtime's arena keeps
    what it allocated, so the figure is the run's high-water mark on the device.
    """
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return float(out.strip().splitlines()[0])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None

"""Writes that lose nothing: staging folders named by their process, cleaned once that process is gone, and one
writer per bundle at a time.

Every folder export and quantize write into starts as `.<name>.partial-<pid>-<random>` beside its destination and
is renamed in when whole. A SIGKILL leaves such a folder behind; the next export or quantize in that place removes
the ones whose process no longer runs. `vtprune quantize` holds an exclusive flock on the bundle folder itself
while it reads the manifest, writes variants and rewrites the manifest, so two at once serialize (the second
waits) and both variants are kept. The folder, not a lock file inside it: a lock file would be a file the bundle
did not have before (and a read-only bundle could not hold one), while flock on the folder's descriptor leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from vtprune.errors import UserError

STAGE = re.compile(r"^\..+\.(?:partial|quantize)-(\d+)-[^/]*$")


def stage_dir(parent: Path, name: str, kind: str = "partial") -> Path:
    """A fresh private folder `.<name>.<kind>-<pid>-<random>` in `parent` (the same filesystem as the destination,
    so the final rename is atomic)."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def clean_stale(parent: Path) -> list[str]:
    """Remove the staging folders in `parent` left by processes that no longer run; returns their names."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = STAGE.match(entry.name)
        if m and entry.is_dir(follow_symlinks=False) and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    return removed


@contextlib.contextmanager
def bundle_lock(root: Path, what: str = "vtprune quantize"):
    """An exclusive lock on the bundle folder for the whole block: a second writer waits (saying so once on a
    terminal) until the first has rewritten the manifest."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise UserError(str(root), f"cannot open the bundle folder to lock it: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(str(root), f"cannot lock the bundle folder: {e.strerror or e}") from None
            if sys.stderr.isatty():
                print(f"waiting for another {what} on {root} to finish...", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock

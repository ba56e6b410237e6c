"""Writes that never leave a half-written file looking valid (model caches, run records, checkpoints, generated
data): write to a temporary sibling, flush it to disk, then rename it over the target in one step. A failure
(disk full, a kill) leaves the previous file — or none — and no temporary; the error is one line naming the
path and the fix."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


class WriteFailed(OSError):
    """A write did not complete; the target was left as it was."""


def _failure(target: Path, err: OSError) -> WriteFailed:
    reason = err.strerror or str(err)
    fix = "free space there or point it elsewhere" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "check the path"
    return WriteFailed(err.errno, f"could not write {target}: {reason} ({fix}); the previous version is untouched")


def atomic_write(target: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, fsync, and rename tmp over `target`; on any error remove tmp and re-raise
    (an OSError as `WriteFailed`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as err:
        raise _failure(target, err) from err
    finally:
        tmp.unlink(missing_ok=True)


def atomic_directory(target: str | Path, write: Callable[[Path], None]) -> None:
    """Like `atomic_write` for a directory of files: `write(tmp_dir)`, then swap it in for `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except OSError as err:
        raise _failure(target, err) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

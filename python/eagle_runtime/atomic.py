"""The one atomic writer: heads, checkpoints, results and the cost cache are all written through it.

A kill at any moment leaves the old file or the new one, never a partial one: the data goes to a temporary file
in the same directory (a rename across file systems is not atomic), is fsynced, renamed over the target and the
directory entry fsynced. The file gets the mode a plain ``open(path, "w")`` would give (0666 less the umask);
``mkstemp``'s 0600 would make a shared results folder unreadable to the rest of a team.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)  # the only portable read of the umask is to set it and put it back
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then make it ``path`` atomically.

    Example::

        atomic_write(out / "model.safetensors", lambda p: safetensors.torch.save_file(state, p))
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut only once the directory is synced
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) into ``path`` atomically."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    """``obj`` as strict JSON (no NaN or Infinity, which other readers reject) into ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text"]

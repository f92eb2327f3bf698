"""The one atomic writer: heads, checkpoints, results and the cost cache are all written through it.

A kill at any moment leaves the old file or the new one, never a partial one: the data goes to a temporary file
in the same directory (a rename across file systems is not atomic), is fsynced, renamed over the target and the
directory entry fsynced. The file gets the mode a plain ``open(path, "w")`` would give (0666 less the umask);
``mkstemp``'s 0600 would make a shared results folder unreadable to the rest of a team. The kernel applies the
umask when the temporary file is created with 0666; the process umask is never read, since the only portable
read sets it, and a file another thread created in that moment would be world-writable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Callable


def _temp_name(path: Path) -> tuple[str, str]:
    """(prefix, suffix) of the temporary files :func:`atomic_write` makes for ``path``."""
    return f".{path.name}.", ".tmp"


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new empty file beside ``path`` named as :func:`remove_orphans` expects, and its mode: created with 0666, so
    the kernel takes off the umask (and applies a default ACL) exactly as for ``open(path, "w")``."""
    prefix, suffix = _temp_name(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.parent / f"{prefix}{secrets.token_hex(4)}{suffix}"  # 8 characters, as mkstemp's
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, os.fstat(fd).st_mode & 0o7777
        finally:
            os.close(fd)


def remove_orphans(path: str | Path) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` of ``path`` left beside it (a SIGKILL or power cut
    mid-write runs no cleanup); returns what was removed. Only names this writer makes are touched
    (``.<name>.<8 random characters>.tmp``); call it only while nothing is writing ``path``."""
    path = Path(path)
    prefix, suffix = _temp_name(path)
    # 8 characters: hex now, mkstemp's alphabet in files an earlier version of this writer left
    pattern = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}" + re.escape(suffix))
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for f in path.parent.iterdir():
            if pattern.fullmatch(f.name) and f.is_file() and not f.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
                    removed.append(f)
    return removed


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (``hashlib.file_digest`` needs Python 3.11; the package
    supports 3.10). Trainer saves record it per published file; ``scripts/fetch_data.py`` checks downloads by it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then make it ``path`` atomically.

    Example::

        atomic_write(out / "model.safetensors", lambda p: safetensors.torch.save_file(state, p))
    """
    path = Path(path)
    tmp, mode = _create_temp(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # ``write`` may have put its own file there (a temp-and-rename at 0600)
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


__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text", "file_sha256", "remove_orphans"]

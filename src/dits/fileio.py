"""Writing files so that a crash never leaves half a file under the final name."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from dits.errors import UserError


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``. The temp file lives in the same
    directory, so the rename is atomic; on any error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; choose a writable output path") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600: give the file the mode a plain open() would have had, so
        # teammates can read runs on a shared machine when the umask allows it.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def write_npz_atomic(path: str | os.PathLike, *args, **arrays) -> Path:
    """``np.savez`` through a file object (given a name, numpy would append '.npz')."""
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, *args, **arrays)
    return atomic_write(path, write)

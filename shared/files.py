"""File helpers every role uses: atomic writes (a reader never sees half a file, a crash
leaves the old one) and human-readable sizes."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np


def write_atomic(path: str | Path, data: bytes | Callable[[io.BufferedWriter], Any], *,
                 private: bool = False) -> Path:
    """Write ``data`` (bytes, or a function that writes to the open file) to ``path`` through
    a unique temporary file beside it, fsync and rename; mode 0600 if ``private``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_npz(path: str | Path, arrays: Mapping[str, Any]) -> Path:
    """``arrays`` as an .npz file, written atomically."""
    plain = {k: np.asarray(v) for k, v in arrays.items()}
    return write_atomic(path, lambda handle: np.savez(handle, **plain))


def write_json(path: str | Path, data: Any, *, indent: int | None = 1) -> Path:
    """``data`` as JSON text (and a final newline), written atomically."""
    return write_atomic(path, (json.dumps(data, indent=indent) + "\n").encode("utf-8"))


def human_bytes(size: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, one decimal (bytes as an integer)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def write_dir_atomically(target: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write a directory with ``write(tmpdir)``, then rename it into place: a reader sees the
    whole directory or none. Safe under races: when another process finished first, its
    directory is kept and this one's is discarded."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

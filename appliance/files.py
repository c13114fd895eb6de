"""Writing a file whole and privately: one helper for every file that may hold a secret."""

from __future__ import annotations

import os
from pathlib import Path


def write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` atomically through a file created with `mode` (never wider, umask or not):
    a secret is never readable by others, not even for a moment."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover keeps its own mode; O_EXCL makes ours
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # before any byte: the umask may have narrowed a public file's mode
        f.write(data)
    os.replace(tmp, path)

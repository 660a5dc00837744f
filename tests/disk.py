"""What is on disk under a folder, to show that a refused call changed nothing there."""

from __future__ import annotations

import os
import stat
from pathlib import Path

_READ_UP_TO = 2**20  # bigger files are compared by size and modification time, not read


def snapshot(root: Path) -> dict[str, tuple]:
    """`{relative path: (kind, content, permission bits, mtime_ns)}` of everything under `root`;
    symlinks are not followed, FIFOs and devices are not opened, big files are not read."""
    root = Path(root)
    found = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                entry = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                entry = ("dir", None)
            elif stat.S_ISREG(info.st_mode):
                entry = ("file", path.read_bytes() if info.st_size <= _READ_UP_TO else info.st_size)
            else:
                entry = ("special", stat.S_IFMT(info.st_mode))
            found[str(path.relative_to(root))] = (*entry, info.st_mode & 0o7777, info.st_mtime_ns)
    return found

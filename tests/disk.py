"""What is on disk under a folder, to show that a refused call changed nothing there."""

from __future__ import annotations

import os
from pathlib import Path


def snapshot(root: Path) -> dict[str, tuple]:
    """`{relative path: (kind, content or link target, permission bits, mtime_ns)}` of everything under
    `root`, symlinks not followed."""
    root = Path(root)
    found = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            if path.is_symlink():
                entry = ("link", os.readlink(path))
            elif path.is_dir():
                entry = ("dir", None)
            else:
                entry = ("file", path.read_bytes())
            found[str(path.relative_to(root))] = (*entry, info.st_mode & 0o7777, info.st_mtime_ns)
    return found

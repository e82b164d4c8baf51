"""Comparing directory trees byte for byte."""

from __future__ import annotations

import os
from pathlib import Path


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path below root with its bytes (None for a directory) and permission bits."""
    out: dict[str, tuple[bytes | None, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            data = path.read_bytes() if path.is_file() else None
            out[str(path.relative_to(root))] = (data, path.stat().st_mode & 0o7777)
    return out

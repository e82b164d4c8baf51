"""A file's identity: what must stay the same for an earlier full hash of it to still count."""

from __future__ import annotations

import os
from typing import NamedTuple


class FileIdentity(NamedTuple):
    """Device, inode, size and both change times. Any write through the filesystem moves mtime
    or ctime, and containerd replacing a blob makes a new inode; bytes that rot on the disk
    itself change none of these, which is what the scrub is for."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def identity_of(path: str) -> FileIdentity | None:
    """The identity of the file at `path`, None when there is none (or it cannot be read)."""
    try:
        return FileIdentity.of(os.stat(path))
    except OSError:
        return None

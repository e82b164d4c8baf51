"""The single-range subset of HTTP Range that registry clients use (containerd resumes with N-)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shoal.oci.errors import RangeInvalid

_SINGLE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")  # \d would take any script's digits


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range to serve, or None for the whole body.

    Several ranges are ignored (the whole body is a valid answer to them, RFC 9110 §14.2);
    a malformed or unsatisfiable single range raises RangeInvalid (416), like Go's ServeContent.
    """
    if header is None:
        return None
    text = header.strip().replace(" ", "")
    if "," in text and text.startswith("bytes="):
        return None
    match = _SINGLE.fullmatch(text)
    if not match or (not match.group(1) and not match.group(2)):
        raise RangeInvalid("invalid range", {"range": header[:100], "size": size})
    first, last = match.group(1), match.group(2)
    if len(first) > 19 or len(last) > 19:
        raise RangeInvalid("range out of bounds", {"range": header[:100], "size": size})
    if not first:  # suffix: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeInvalid("unsatisfiable range", {"range": header, "size": size})
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        raise RangeInvalid("unsatisfiable range", {"range": header, "size": size})
    return ByteRange(start, min(end, size - 1))

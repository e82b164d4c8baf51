"""Content digests: parsing, and hashing that can be checked while bytes stream by."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from shoal.oci.errors import DigestInvalid

# Algorithms shoal can verify, with the exact length of their lowercase hex encoding.
_ALGORITHMS = {"sha256": 64, "sha512": 128}
_GRAMMAR = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


@dataclass(frozen=True, order=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parses `algo:hex`; anything shoal cannot verify is DIGEST_INVALID."""
        if len(text) > 200 or not _GRAMMAR.fullmatch(text):
            raise DigestInvalid("invalid digest", {"digest": text[:200]})
        algorithm, _, encoded = text.partition(":")
        size = _ALGORITHMS.get(algorithm)
        if size is None:
            raise DigestInvalid("unsupported digest algorithm", {"digest": text})
        if len(encoded) != size or not re.fullmatch(r"[0-9a-f]+", encoded):
            raise DigestInvalid("invalid digest", {"digest": text})
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def matches(self, hasher: hashlib._Hash) -> bool:
        return hasher.hexdigest() == self.hex

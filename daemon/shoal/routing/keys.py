"""How shoal's key strings become DHT keys.

A key (`sha256:<hex>` or `<registry>/<repo>:<tag>`) is never handed to py-libp2p as a string:
`kad_dht._encode_key` would hex-decode a tag like `deadbeef`, and a 71-byte `sha256:…` key breaks
the iterative lookups (servers reset keys over 80/128 bytes). Like Spegel, every key string is
hashed into a sha2-256 multihash, the payload of CIDv1(raw, sha2-256(key)); XOR distance is then
sha256(multihash) against sha256(peer id), the same as go-libp2p's keyspace.
"""

from __future__ import annotations

import base64
import hashlib

_SHA2_256 = b"\x12\x20"  # multihash code 0x12 (sha2-256), digest length 32
_CIDV1_RAW = b"\x01\x55"  # CID version 1, multicodec 0x55 (raw)


def key_multihash(key: str) -> bytes:
    """The 34-byte DHT key for `key`: multihash(sha2-256(utf-8 key))."""
    return _SHA2_256 + hashlib.sha256(key.encode("utf-8")).digest()


def key_cid(key: str) -> str:
    """CIDv1(raw) of `key` in multibase base32 (`bafkrei…`), as Spegel advertises it."""
    raw = _CIDV1_RAW + key_multihash(key)
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


def keyspace_point(multihash: bytes) -> int:
    """Where a DHT key sits in Kademlia's XOR space (py-libp2p and go-libp2p hash it again)."""
    return int.from_bytes(hashlib.sha256(multihash).digest(), "big")

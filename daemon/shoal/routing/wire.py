"""The bulk announce protocol: one stream per target peer carrying many keys.

Stock `provide()` sends one ADD_PROVIDER per key per peer (≈95 ms CPU per key) and receivers
drop most of them to rate limiting. Here a node opens one stream to each peer that is among the
closest to some of its keys and sends frames of many keys; the receiver writes them into its
normal provider store, so standard GET_PROVIDERS (and our lookup) find them.

Stream: `/shoal/announce/1.0.0`. Each request frame is `uvarint(len) body`, with body:

    op: 1 byte (1 = add, 2 = remove)
    uvarint n_addrs, then n_addrs x (uvarint len, multiaddr bytes)   # the provider's addresses
    uvarint n_keys,  then n_keys  x (uvarint len, multihash bytes)

The provider is always the authenticated remote peer, never a field. Each request is answered
by `uvarint(len) uvarint(records applied)`. The sender closes its side when done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ANNOUNCE_PROTOCOL = "/shoal/announce/1.0.0"

OP_ADD = 1
OP_REMOVE = 2

MAX_FRAME = 1 << 20  # bytes
MAX_KEYS_PER_FRAME = 8192
MAX_KEY_LEN = 80  # the DHT's own ADD_PROVIDER limit
MAX_ADDRS = 8


class WireError(ValueError):
    """A malformed or oversized frame."""


def encode_uvarint(value: int) -> bytes:
    if value < 0:
        raise ValueError("uvarint must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """Returns (value, next position)."""
    value = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated uvarint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireError("uvarint too long")


@dataclass(frozen=True)
class Announce:
    op: int
    addrs: list[bytes]
    keys: list[bytes]


def _put_bytes_list(out: bytearray, items: list[bytes]) -> None:
    out += encode_uvarint(len(items))
    for item in items:
        out += encode_uvarint(len(item))
        out += item


def encode_announce(op: int, addrs: list[bytes], keys: list[bytes]) -> bytes:
    """One framed request (length prefix included)."""
    if op not in (OP_ADD, OP_REMOVE):
        raise ValueError(f"unknown op {op}")
    if len(keys) > MAX_KEYS_PER_FRAME or len(addrs) > MAX_ADDRS:
        raise ValueError("too many keys or addresses for one frame")
    body = bytearray([op])
    _put_bytes_list(body, addrs)
    _put_bytes_list(body, keys)
    if len(body) > MAX_FRAME:
        raise ValueError("frame too large")
    return encode_uvarint(len(body)) + bytes(body)


def _get_bytes_list(body: bytes, pos: int, limit: int, max_len: int) -> tuple[list[bytes], int]:
    count, pos = decode_uvarint(body, pos)
    if count > limit:
        raise WireError(f"{count} items exceed the limit of {limit}")
    items = []
    for _ in range(count):
        length, pos = decode_uvarint(body, pos)
        if length == 0 or length > max_len or pos + length > len(body):
            raise WireError("bad item length")
        items.append(body[pos : pos + length])
        pos += length
    return items, pos


def decode_announce(body: bytes) -> Announce:
    """Parse a request body (without its length prefix)."""
    if not body:
        raise WireError("empty frame")
    op = body[0]
    if op not in (OP_ADD, OP_REMOVE):
        raise WireError(f"unknown op {op}")
    addrs, pos = _get_bytes_list(body, 1, MAX_ADDRS, 256)
    keys, pos = _get_bytes_list(body, pos, MAX_KEYS_PER_FRAME, MAX_KEY_LEN)
    if pos != len(body):
        raise WireError("trailing bytes")
    return Announce(op, addrs, keys)


def encode_ack(applied: int) -> bytes:
    body = encode_uvarint(applied)
    return encode_uvarint(len(body)) + body


def decode_ack(body: bytes) -> int:
    value, pos = decode_uvarint(body, 0)
    if pos != len(body):
        raise WireError("trailing bytes in ack")
    return value


async def read_message(stream: Any, max_len: int) -> bytes:
    """Read one uvarint-prefixed message in as few reads as the data allows.

    libp2p's `read_varint_prefixed_bytes_limited` reads the prefix a byte at a time (a stream
    read each). Request/response exchanges never have bytes past the message, so any are a
    protocol error. A clean end of stream before any byte raises EOFError.
    """
    buf = b""
    while True:
        if buf:
            try:
                length, pos = decode_uvarint(buf, 0)
            except WireError:
                if len(buf) > 9:
                    raise
            else:
                if length > max_len:
                    raise WireError(f"message of {length} bytes exceeds {max_len}")
                if len(buf) >= pos + length:
                    if len(buf) > pos + length:
                        raise WireError("unexpected bytes after the message")
                    return buf[pos:]
        try:
            chunk = await stream.read(65536)
        except EOFError:
            chunk = b""
        if not chunk:
            if buf:
                raise WireError("stream ended inside a message")
            raise EOFError("end of stream")
        buf += chunk

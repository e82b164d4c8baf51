"""Routing building blocks without a network: key encoding, the announce wire format, options."""

from __future__ import annotations

import hashlib
import stat

import pytest

from shoal.routing import wire
from shoal.routing.keys import key_cid, key_multihash, keyspace_point
from shoal.routing.options import (
    http_hostport,
    ip_multiaddr,
    read_psk,
    resolve_p2p_addresses,
    split_host_port,
)

DIGEST = "sha256:" + "ab" * 32
TAG = "registry.example:5000/library/nginx:1.27"


def test_key_is_a_sha256_multihash_of_the_string() -> None:
    mh = key_multihash(DIGEST)
    assert mh[:2] == b"\x12\x20" and len(mh) == 34
    assert mh[2:] == hashlib.sha256(DIGEST.encode()).digest()
    assert key_multihash(TAG) != mh


@pytest.mark.parametrize("key", ["deadbeef", "cafe", "a" * 200, DIGEST, TAG, "ünïcode/x:y"])
def test_every_key_becomes_34_bytes(key: str) -> None:
    # A tag like `deadbeef` must not be hex-decoded, long keys must fit the DHT's 80-byte limit.
    assert len(key_multihash(key)) == 34


def test_cid_string_is_what_libp2p_would_encode_to_the_same_multihash() -> None:
    from libp2p.kad_dht.kad_dht import _encode_key

    cid = key_cid(TAG)
    assert cid.startswith("bafkrei")  # CIDv1, raw, sha2-256, base32
    assert _encode_key(cid) == key_multihash(TAG)


def test_keyspace_point_matches_libp2p_distance() -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.kad_dht.utils import sort_peer_ids_by_distance
    from libp2p.peer.id import ID

    key = key_multihash(DIGEST)
    peers = [ID.from_pubkey(create_new_key_pair().public_key) for _ in range(8)]
    ours = sorted(peers, key=lambda p: keyspace_point(p.to_bytes()) ^ keyspace_point(key))
    assert ours == sort_peer_ids_by_distance(key, peers)


def test_announce_frame_round_trip() -> None:
    keys = [key_multihash(f"k{i}") for i in range(1000)]
    addrs = [b"\x04\x7f\x00\x00\x01\x06\x75\x36"]
    frame = wire.encode_announce(wire.OP_ADD, addrs, keys)
    length, pos = wire.decode_uvarint(frame, 0)
    assert len(frame) - pos == length
    msg = wire.decode_announce(frame[pos:])
    assert (msg.op, msg.addrs, msg.keys) == (wire.OP_ADD, addrs, keys)
    body = wire.encode_ack(1000)
    assert wire.decode_ack(body[1:]) == 1000


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x09\x00\x00",  # unknown op
        b"\x01\x00\x01\x51" + b"x" * 81,  # key over 80 bytes
        b"\x01\x00\x02\x02ab",  # two keys announced, one present
        b"\x01\x00\x01\x02abEXTRA",  # trailing bytes
        b"\x01\x09",  # too many addresses
    ],
)
def test_malformed_frames_are_rejected(body: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_announce(body)


def test_frame_limits_are_enforced_when_encoding() -> None:
    with pytest.raises(ValueError):
        wire.encode_announce(wire.OP_ADD, [], [b"k"] * (wire.MAX_KEYS_PER_FRAME + 1))
    with pytest.raises(ValueError):
        wire.encode_announce(7, [], [])


class _Chunks:
    """A stream returning the given chunks, then end of stream."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    async def read(self, n: int = -1) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


async def test_read_message_reassembles_split_frames() -> None:
    payload = b"x" * 300
    framed = wire.encode_uvarint(300) + payload
    assert await wire.read_message(_Chunks(framed[:1], framed[1:2], framed[2:]), 1000) == payload
    with pytest.raises(EOFError):
        await wire.read_message(_Chunks(), 1000)
    with pytest.raises(wire.WireError):
        await wire.read_message(_Chunks(framed[:50]), 1000)  # ends inside the message
    with pytest.raises(wire.WireError):
        await wire.read_message(_Chunks(framed), 100)  # over the limit
    with pytest.raises(wire.WireError):
        await wire.read_message(_Chunks(framed + b"more"), 1000)


def test_host_port_parsing() -> None:
    assert split_host_port("0.0.0.0:30022") == ("0.0.0.0", 30022)
    assert split_host_port("[::]:30022") == ("::", 30022)
    assert split_host_port("10.0.0.5", 30022) == ("10.0.0.5", 30022)
    assert split_host_port("fd00::5", 1) == ("fd00::5", 1)
    with pytest.raises(ValueError):
        split_host_port("10.0.0.5")
    assert http_hostport("fd00::5", 30020) == "[fd00::5]:30020"
    assert ip_multiaddr("fd00::5", 4) == "/ip6/fd00::5/tcp/4"


def test_announce_address_is_never_unspecified() -> None:
    assert resolve_p2p_addresses("0.0.0.0:30022", "10.1.2.3") == (
        "0.0.0.0",
        30022,
        "10.1.2.3",
        30022,
    )
    assert resolve_p2p_addresses("0.0.0.0:30022", "10.1.2.3:4001")[2:] == ("10.1.2.3", 4001)
    assert resolve_p2p_addresses("127.0.0.7:0", "")[2:] == ("127.0.0.7", 0)
    listen, _, announce, _ = resolve_p2p_addresses("0.0.0.0:30022", "")
    assert listen == "0.0.0.0" and announce not in ("0.0.0.0", "::")
    with pytest.raises(ValueError):
        resolve_p2p_addresses("0.0.0.0:30022", "0.0.0.0")


def test_psk_file_formats(tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = "0123456789abcdef" * 4
    go_style = tmp_path / "swarm.key"
    go_style.write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{key.upper()}\n")
    bare = tmp_path / "bare"
    bare.write_text(key + "\n")
    assert read_psk(str(go_style)) == key
    assert read_psk(str(bare)) == key
    assert read_psk("") is None
    bad = tmp_path / "bad"
    bad.write_text("not a key")
    with pytest.raises(ValueError):
        read_psk(str(bad))
    b64 = tmp_path / "b64"
    b64.write_text("/key/swarm/psk/1.0.0/\n/base64/\nAAAA\n")
    with pytest.raises(ValueError):
        read_psk(str(b64))


def test_identity_is_created_private_and_reused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from libp2p.peer.id import ID

    from shoal.routing.libp2p.router import load_or_create_identity

    path = tmp_path / "identity.key"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_identity(path)
    assert ID.from_pubkey(first.public_key) == ID.from_pubkey(again.public_key)
    assert str(ID.from_pubkey(first.public_key)).startswith("12D3KooW")  # Ed25519
    path.write_bytes(b"garbage")
    replaced = load_or_create_identity(path)  # unreadable: a new identity, not a crash
    assert ID.from_pubkey(replaced.public_key) != ID.from_pubkey(first.public_key)

"""Parsing of what arrives in a request: names, references, digests, ns, ranges, media types."""

from __future__ import annotations

import json

import pytest

from shoal.oci import mediatypes as mt
from shoal.oci.digest import Digest
from shoal.oci.errors import DigestInvalid, NameInvalid, RangeInvalid, error_body
from shoal.oci.names import make_reference, parse_registry_host, parse_repository
from shoal.oci.ranges import ByteRange, parse_range

HEX = "a" * 64


@pytest.mark.parametrize("name", ["library/busybox", "a", "foo/bar-baz/q__x.y", "a1/b2/c3"])
def test_valid_repository_names(name: str) -> None:
    assert parse_repository(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "Upper/case", "a//b", "-a", "a-", "a/../b", "a b", "a/b/", "/a", "a" * 256, "a..b", "é"],
)
def test_invalid_repository_names(name: str) -> None:
    with pytest.raises(NameInvalid):
        parse_repository(name)


def test_digest_round_trip_and_hashing() -> None:
    d = Digest.parse(f"sha256:{HEX}")
    assert (d.algorithm, d.hex, str(d)) == ("sha256", HEX, f"sha256:{HEX}")
    assert Digest.of(b"abc") == Digest.parse(
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert Digest.parse("sha512:" + "0" * 128).algorithm == "sha512"


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + "A" * 64,  # upper-case hex is not canonical
        "sha256:" + "a" * 63,
        "sha256:" + "g" * 64,
        "md5:" + "a" * 32,  # cannot verify it
        "sha256",
        ":" + HEX,
        "sha256:",
        "sha256:../../etc/passwd",
        "sha256:" + HEX + "\n",
    ],
)
def test_invalid_digests(text: str) -> None:
    with pytest.raises(DigestInvalid):
        Digest.parse(text)


@pytest.mark.parametrize(
    ("ns", "expected"),
    [
        ("docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("Quay.IO", "quay.io"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("[::1]:5000", "[::1]:5000"),
        ("my-registry.example.com:443", "my-registry.example.com:443"),
    ],
)
def test_registry_hosts(ns: str, expected: str) -> None:
    assert parse_registry_host(ns) == expected


@pytest.mark.parametrize(
    "ns",
    [
        "",
        "user:pass@evil.com",
        "evil.com/path",
        "evil.com:0",
        "evil.com:65536",
        "evil.com:80x",
        "-bad.com",
        "a b",
        "[::1",
        "[nope]:1",
        "host\r\nX-Injected: 1",
        "a" * 300,
        "http://evil.com",
    ],
)
def test_hostile_ns_rejected(ns: str) -> None:
    with pytest.raises(NameInvalid):
        parse_registry_host(ns)


def test_references() -> None:
    ref = make_reference("docker.io", "alpine", "3.19")
    assert ref.repository == "library/alpine"
    assert ref.image_name == "docker.io/library/alpine:3.19"
    ref = make_reference("127.0.0.1:5000", "team/app", f"sha256:{HEX}")
    assert ref.digest == Digest("sha256", HEX) and ref.tag is None and ref.image_name is None
    assert make_reference(None, "team/app", "v1").image_name is None
    with pytest.raises(NameInvalid):
        make_reference("docker.io", "x", "-bad-tag")
    with pytest.raises(NameInvalid):
        make_reference("docker.io", "x", "t" * 129)
    with pytest.raises(DigestInvalid):
        make_reference("docker.io", "x", "sha256:xyz")


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-", 10, ByteRange(0, 9)),
        ("bytes=4-", 10, ByteRange(4, 9)),
        ("bytes=2-5", 10, ByteRange(2, 5)),
        ("bytes=2-500", 10, ByteRange(2, 9)),
        ("bytes=-3", 10, ByteRange(7, 9)),
        ("bytes=-30", 10, ByteRange(0, 9)),
        ("bytes=0-0,5-6", 10, None),  # several ranges: the whole body is a valid answer
    ],
)
def test_ranges(header: str | None, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    "header", ["bytes=10-", "bytes=5-2", "bytes=-0", "bytes=-", "items=0-1", "bytes=a-b", "0-1"]
)
def test_bad_ranges(header: str) -> None:
    with pytest.raises(RangeInvalid):
        parse_range(header, 10)


def test_content_range_header() -> None:
    assert ByteRange(4, 9).content_range(10) == "bytes 4-9/10"


def _doc(**kw: object) -> bytes:
    return json.dumps({"schemaVersion": 2, **kw}).encode()


def test_media_type_detection() -> None:
    assert mt.detect_media_type(_doc(mediaType=mt.DOCKER_MANIFEST)) == mt.DOCKER_MANIFEST
    assert mt.detect_media_type(_doc(mediaType=mt.OCI_INDEX, manifests=[])) == mt.OCI_INDEX
    # OCI documents may omit mediaType: their shape tells.
    assert mt.detect_media_type(_doc(manifests=[])) == mt.OCI_INDEX
    assert mt.detect_media_type(_doc(config={}, layers=[])) == mt.OCI_MANIFEST
    # Not manifests: a layer, a config, JSON arrays, schema 1, unknown declared types.
    assert mt.detect_media_type(b"\x1f\x8b\x08\x00") is None
    assert mt.detect_media_type(json.dumps({"architecture": "amd64"}).encode()) is None
    assert mt.detect_media_type(b"[1,2]") is None
    assert mt.detect_media_type(json.dumps({"schemaVersion": 1}).encode()) is None
    assert mt.detect_media_type(_doc(mediaType="text/html")) is None


def test_error_body_shape() -> None:
    body = json.loads(error_body("BLOB_UNKNOWN", "blob unknown", {"digest": "x"}))
    assert body == {
        "errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown", "detail": {"digest": "x"}}]
    }

"""Property-based tests of every parser a client's input reaches: whatever the text, each
either returns a value it guarantees or raises its own OCI error; valid input round-trips."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from shoal.content.model import Descriptor
from shoal.oci import mediatypes as mt
from shoal.oci.digest import Digest
from shoal.oci.errors import DigestInvalid, NameInvalid, RangeInvalid, RegistryError
from shoal.oci.manifest import children
from shoal.oci.names import (
    Reference,
    is_tag,
    make_reference,
    parse_registry_host,
    parse_repository,
)
from shoal.oci.ranges import parse_range
from shoal.registry.middleware import namespace_header
from shoal.upstream.challenge import parse_challenges
from shoal.upstream.credentials import parse_config
from shoal.upstream.manifests import descriptor_from_headers
from shoal.upstream.transport import retry_after

# Text as clients send it: any code point, and the ASCII that grammars trip over, often.
ANY = st.text(st.characters(), max_size=300) | st.text(string.printable, max_size=300)
COMPONENT = st.from_regex(r"\A[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*\Z", fullmatch=True)
LABEL = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?\Z", fullmatch=True)
PORT = st.integers(1, 65535)


@st.composite
def hosts(draw: st.DrawFn) -> str:
    name = ".".join(draw(st.lists(LABEL, min_size=1, max_size=4)))
    port = draw(st.none() | PORT)
    return name if port is None else f"{name}:{port}"


@st.composite
def digests(draw: st.DrawFn) -> str:
    algorithm, length = draw(st.sampled_from([("sha256", 64), ("sha512", 128)]))
    return f"{algorithm}:" + draw(st.text("0123456789abcdef", min_size=length, max_size=length))


@given(ANY | COMPONENT.map(lambda c: c + "\n"))
@example("team/app\n")  # re's $ matches before a final newline
def test_repository_names(text: str) -> None:
    try:
        name = parse_repository(text)
    except NameInvalid:
        return
    assert name == text and len(name) <= 255 and name.isprintable() and "//" not in name


@given(
    ANY
    | st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,130}\Z", fullmatch=True).map(
        lambda t: t + ("\n" if len(t) % 2 else "")
    )
)
@example("v1\n")
def test_tags(text: str) -> None:
    if is_tag(text):  # what becomes part of an image name, a DHT key and an upstream URL
        assert text.isprintable() and 0 < len(text) <= 128 and "/" not in text


@given(st.lists(COMPONENT, min_size=1, max_size=5).map("/".join))
def test_valid_repository_names_parse(name: str) -> None:
    if len(name) <= 255:
        assert parse_repository(name) == name


NEAR_HOSTS = st.tuples(
    hosts() | st.sampled_from(["[::1]", "[fe80::1", "localhost", "-a.b", "a_b.c", ""]),
    st.sampled_from(["", ":", ":0", ":65536", ":²", ":05", "/v2", "@x", " ", "\x01", "%0d"]),
).map("".join)


@given(ANY | NEAR_HOSTS)
def test_registry_hosts(text: str) -> None:
    try:
        host = parse_registry_host(text)
    except NameInvalid:
        assert namespace_header(text) is None
        return
    # What may reach a URL's authority and a response header: no path, credentials or spaces.
    assert host.isprintable() and host == host.lower()
    assert not set(host) & set("/@?# \t\\")
    assert namespace_header(text) == host


@given(hosts())
def test_valid_registry_hosts_parse(host: str) -> None:
    assert parse_registry_host(host) == host
    assert parse_registry_host(host.upper()) == host


@given(ANY, ANY, ANY)
def test_references(ns: str, name: str, reference: str) -> None:
    try:
        ref = make_reference(ns, name, reference)
    except RegistryError as err:
        assert err.status == 400
        return
    assert isinstance(ref, Reference)
    assert (ref.tag is None) != (ref.digest is None)


NEAR_DIGESTS = st.tuples(
    st.sampled_from(["sha256", "sha512", "SHA256", "md5", "sha256+b64", ""]),
    st.sampled_from([":", "", "::"]),
    st.text("0123456789abcdefABCDEF=_-", max_size=140),
).map("".join)


@given(ANY | NEAR_DIGESTS | digests())
def test_digests(text: str) -> None:
    try:
        digest = Digest.parse(text)
    except DigestInvalid:
        return
    # Only what shoal can verify; it becomes a file name under the content store, too.
    assert len(digest.hex) == {"sha256": 64, "sha512": 128}[digest.algorithm]
    assert set(digest.hex) <= set("0123456789abcdef") and str(digest) == text


@given(digests())
def test_valid_digests_round_trip(text: str) -> None:
    assert str(Digest.parse(text)) == text


NUMBER = (
    st.integers(0, 200).map(str)
    | st.integers(0, 2**64).map(str)
    | st.sampled_from(["", "-1", "0x10", " 5", "01", "²"])
)
NEAR_RANGES = st.tuples(
    st.sampled_from(["bytes=", "bytes =", "Bytes=", "items=", ""]),
    NUMBER,
    st.sampled_from(["-", "--", ""]),
    NUMBER,
    st.sampled_from(["", ",0-1", ", 5-", ";"]),
).map("".join)


@given(ANY | NEAR_RANGES | st.none(), st.integers(0, 2**63) | st.integers(0, 100))
def test_ranges(header: str | None, size: int) -> None:
    try:
        rng = parse_range(header, size)
    except RangeInvalid as err:
        assert err.status == 416
        return
    if rng is not None:
        assert 0 <= rng.start <= rng.end < size
        assert rng.content_range(size).isprintable()


@given(st.integers(0, 10**12), st.integers(0, 10**12), st.integers(1, 10**12))
def test_valid_ranges_mean_what_they_say(first: int, last: int, size: int) -> None:
    if first >= size or last < first:
        with pytest.raises(RangeInvalid):  # unsatisfiable: 416
            parse_range(f"bytes={first}-{last}", size)
        return
    rng = parse_range(f"bytes={first}-{last}", size)
    assert rng is not None and (rng.start, rng.end) == (first, min(last, size - 1))
    suffix = parse_range(f"bytes=-{last + 1}", size)
    assert suffix is not None and suffix.end == size - 1
    assert suffix.length == min(last + 1, size)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
MANIFESTISH = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.sampled_from([1, 2, "2", None]),
        "mediaType": st.sampled_from([*sorted(mt.ALL_MANIFEST_TYPES), "text/plain", ""]) | ANY,
        "manifests": JSON,
        "config": JSON,
        "layers": JSON,
    },
)


@given(
    st.binary(max_size=200)
    | JSON.map(lambda d: json.dumps(d).encode())
    | MANIFESTISH.map(lambda d: json.dumps(d).encode()),
    st.none() | st.sampled_from(sorted(mt.ALL_MANIFEST_TYPES)) | ANY,
)
def test_media_types(body: bytes, hint: str | None) -> None:
    kind = mt.manifest_media_type(body, hint)
    assert kind is None or kind in mt.ALL_MANIFEST_TYPES  # all a Content-Type ever gets
    shape = mt.detect_media_type(body)
    assert shape is None or shape in mt.ALL_MANIFEST_TYPES
    doc = mt.parse_manifest(body)
    if doc is not None and shape is not None:
        for desc, _, _ in children(doc, shape):
            Digest.parse(desc.digest)  # only valid digests are walked


@given(st.dictionaries(st.sampled_from(["Docker-Content-Digest", "Content-Length",
                                        "Content-Type"]), ANY))  # fmt: skip
def test_upstream_descriptors(headers: dict[str, str]) -> None:
    desc = descriptor_from_headers(headers)
    if desc is not None:
        assert isinstance(desc, Descriptor)
        assert 0 < desc.size <= mt.MAX_MANIFEST_BYTES and desc.media_type in mt.ALL_MANIFEST_TYPES


@given(ANY | st.none())
def test_retry_after(value: str | None) -> None:
    wait = retry_after(value)
    assert wait is None or wait >= 0


@given(st.lists(ANY, max_size=4))
def test_challenges(values: list[str]) -> None:
    for challenge in parse_challenges(values):
        assert challenge.scheme == challenge.scheme.lower()


@given(st.binary(max_size=300) | JSON.map(lambda d: json.dumps({"auths": d}).encode()))
def test_credentials_files(data: bytes) -> None:
    try:
        auths = parse_config(data)
    except ValueError:  # its contract: not such a file
        return
    for registry, (user, password) in auths.items():
        assert isinstance(registry, str) and isinstance(user, str) and isinstance(password, str)

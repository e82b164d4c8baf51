"""Manifests from upstream: tag HEADs, and GETs that are bounded and verified before use."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shoal.content.model import Descriptor
from shoal.oci import mediatypes as mt
from shoal.oci.digest import Digest
from shoal.oci.errors import DigestInvalid
from shoal.upstream.allowlist import Endpoint
from shoal.upstream.blobs import content_length
from shoal.upstream.client import RegistryClient
from shoal.upstream.errors import UpstreamDigestMismatch, UpstreamInvalid
from shoal.upstream.transport import read_limited

ACCEPT = {
    "Accept": ", ".join(
        [mt.OCI_INDEX, mt.OCI_MANIFEST, mt.DOCKER_MANIFEST_LIST, mt.DOCKER_MANIFEST]
    )
}


@dataclass(frozen=True)
class FetchedManifest:
    body: bytes
    digest: Digest
    media_type: str | None  # None: not a manifest type shoal serves


def _media_type(value: str | None) -> str | None:
    kind = (value or "").split(";", 1)[0].strip().lower()
    return kind if kind in mt.ALL_MANIFEST_TYPES else None


def descriptor_from_headers(headers: Mapping[str, str]) -> Descriptor | None:
    """The descriptor a tag HEAD announced, or None when any part is missing or unusable."""
    try:
        digest = Digest.parse(headers.get("Docker-Content-Digest", "").strip())
    except DigestInvalid:
        return None
    size = content_length(headers.get("Content-Length"))
    media_type = _media_type(headers.get("Content-Type"))
    if size is None or not 0 < size <= mt.MAX_MANIFEST_BYTES or media_type is None:
        return None
    return Descriptor(media_type, digest, size)


async def head_tag(
    client: RegistryClient, endpoint: Endpoint, repository: str, tag: str
) -> Descriptor | None:
    """What the tag points at; None when upstream says it does not exist.

    A HEAD that lacks the digest, length or a known type is followed by a GET whose bytes are
    hashed, as containerd does.
    """
    resp = await client.request(endpoint, "HEAD", repository, "manifests", tag, headers=ACCEPT)
    try:
        if resp.status == 404:
            return None
        if resp.status == 200:
            desc = descriptor_from_headers(resp.headers)
            if desc is not None:
                return desc
    finally:
        resp.release()
    fetched = await get_manifest(client, endpoint, repository, tag, None)
    if fetched is None or fetched.media_type is None:
        return None
    return Descriptor(fetched.media_type, fetched.digest, len(fetched.body))


async def get_manifest(
    client: RegistryClient,
    endpoint: Endpoint,
    repository: str,
    reference: str,
    expected: Digest | None,
) -> FetchedManifest | None:
    """The manifest's bytes (at most MAX_MANIFEST_BYTES), None on 404.

    Raises UpstreamDigestMismatch unless they hash to `expected` (by digest) and to the
    `Docker-Content-Digest` the registry announced (by tag or digest).
    """
    resp = await client.request(endpoint, "GET", repository, "manifests", reference, headers=ACCEPT)
    try:
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise UpstreamInvalid(f"manifest {reference} at {endpoint.registry}: {resp.status}")
        body = await read_limited(resp, mt.MAX_MANIFEST_BYTES)
        announced_text = resp.headers.get("Docker-Content-Digest", "").strip()
        content_type = resp.headers.get("Content-Type")
    finally:
        resp.release()
    announced = None
    if announced_text:
        try:
            announced = Digest.parse(announced_text)
        except DigestInvalid as exc:
            raise UpstreamInvalid(f"bad Docker-Content-Digest from {endpoint.registry}") from exc
    for claim in (expected, announced):
        if claim is not None and Digest.of(body, claim.algorithm) != claim:
            raise UpstreamDigestMismatch(
                f"manifest {reference} at {endpoint.registry} does not hash to {claim}"
            )
    digest = expected or announced or Digest.of(body)
    media_type = mt.detect_media_type(body) or _media_type(content_type)
    return FetchedManifest(body, digest, media_type)

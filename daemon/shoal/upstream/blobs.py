"""Blobs from upstream, streamed on demand (manifests are read whole: `manifests`).

An UpstreamBlob never holds a blob in memory. A body cut midway is resumed with `Range` from the
last byte received (a registry that ignores Range and answers 200 has the prefix skipped); a body
that stays short raises UpstreamIncomplete. A whole-blob read is also hashed, and its last chunk
held back until the digest matched, so a consumer that does not verify still never sees a
complete wrong blob (`shoal.content.verify`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator

import aiohttp

from shoal.content.model import STREAMED, Delivery, SourceKind
from shoal.content.verify import Hashing, hold_back
from shoal.oci.digest import Digest
from shoal.upstream.allowlist import Endpoint
from shoal.upstream.client import RegistryClient
from shoal.upstream.errors import (
    UpstreamDigestMismatch,
    UpstreamIncomplete,
    UpstreamInvalid,
    UpstreamUnavailable,
)
from shoal.upstream.transport import RETRYABLE

log = logging.getLogger("shoal.upstream")

CHUNK = 256 * 1024
_CONTENT_RANGE = re.compile(r"^bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)$")  # ASCII digits only


class _Short(Exception):
    """A body that ended before the bytes it promised (without a transport error)."""


class UpstreamBlob:
    """Not verified as a Blob: `verify` covers whole reads only, ranges are not."""

    def __init__(
        self,
        client: RegistryClient,
        endpoint: Endpoint,
        repository: str,
        digest: Digest,
        size: int,
        *,
        verify: bool = True,
        resume_attempts: int = 3,
        source: SourceKind = SourceKind.UPSTREAM,
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.repository = repository
        self.digest = digest
        self.size = size
        self.verify = verify
        self.resume_attempts = resume_attempts
        self.source = source

    def delivery(self) -> Delivery:
        return STREAMED

    def open(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end). Raises an UpstreamError (a ConnectionError) if they cannot all
        be had, UpstreamDigestMismatch if a whole-blob read hashes wrong."""
        end = min(end, self.size)
        if not (self.verify and start == 0 and end == self.size):
            return self._stream(start, end, None)
        hashing = Hashing(self.digest)

        async def check() -> None:
            if not hashing.matches(self.size):
                raise UpstreamDigestMismatch(
                    f"{self.endpoint.registry} sent {self.digest} hashing to {hashing.hexdigest}"
                )

        return hold_back(self._stream(start, end, hashing), check)

    async def _stream(self, start: int, end: int, hashing: Hashing | None) -> AsyncIterator[bytes]:
        pos, failures = start, 0
        while pos < end:
            resp: aiohttp.ClientResponse | None = None
            try:
                resp = await self._get(pos, end)
                skip = pos if resp.status == 200 else 0  # Range ignored: drop what we have
                async for chunk in resp.content.iter_chunked(CHUNK):
                    if skip:
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk, skip = chunk[skip:], 0
                    chunk = chunk[: end - pos]
                    pos += len(chunk)
                    if hashing is not None:
                        await hashing.feed(chunk)
                    yield chunk
                    if pos >= end:
                        break
                if pos < end:
                    raise _Short(f"body ended at byte {pos} of {end}")
            except (*RETRYABLE, _Short) as exc:
                failures += 1
                if failures > self.resume_attempts:
                    raise UpstreamIncomplete(
                        f"{self.digest} from {self.endpoint.registry}: {pos} of {end} bytes"
                    ) from exc
                log.info("resuming %s at byte %d: %r", self.digest, pos, exc)
                await asyncio.sleep(self.client.transport.retry.pause(failures - 1))
            finally:
                if resp is not None:
                    resp.close()  # also when the consumer stops early: never reuse a half-read one

    async def _get(self, pos: int, end: int) -> aiohttp.ClientResponse:
        headers = {}
        if pos > 0 or end < self.size:
            headers["Range"] = f"bytes={pos}-" if end == self.size else f"bytes={pos}-{end - 1}"
        resp = await self.client.request(
            self.endpoint, "GET", self.repository, "blobs", str(self.digest), headers=headers
        )
        problem = _check_answer(resp, pos, self.size)
        if problem is not None:
            resp.close()
            error = UpstreamUnavailable if resp.status >= 500 else UpstreamInvalid
            raise error(f"{self.digest} from {self.endpoint.registry}: {problem}")
        return resp


def _check_answer(resp: aiohttp.ClientResponse, pos: int, size: int) -> str | None:
    """Why this answer to a (ranged) GET cannot give bytes from `pos` on, or None."""
    if resp.status == 200:
        if resp.content_length is not None and resp.content_length != size:
            return f"{resp.content_length} bytes, expected {size}"
        return None
    if resp.status != 206:
        return f"status {resp.status}"
    match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    if match is None or int(match.group(1)) != pos:
        return f"Content-Range {resp.headers.get('Content-Range')!r} for a range from {pos}"
    if match.group(3) != "*" and int(match.group(3)) != size:
        return f"Content-Range total {match.group(3)}, expected {size}"
    return None


async def blob_size(
    client: RegistryClient, endpoint: Endpoint, repository: str, digest: Digest
) -> int | None:
    """The blob's size from a HEAD (or, lacking Content-Length there, a GET's), None on 404."""
    resp = await client.request(endpoint, "HEAD", repository, "blobs", str(digest))
    try:
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise UpstreamInvalid(f"HEAD {digest} at {endpoint.registry}: {resp.status}")
        announced = resp.headers.get("Docker-Content-Digest")
        if announced and announced.strip() != str(digest):
            raise UpstreamDigestMismatch(f"HEAD {digest} at {endpoint.registry}: {announced}")
        size = content_length(resp.headers.get("Content-Length"))
    finally:
        resp.release()
    if size is not None:
        return size
    resp = await client.request(endpoint, "GET", repository, "blobs", str(digest))
    try:  # only the headers are wanted; close() drops the connection and the body with it
        if resp.status == 404:
            return None
        size = resp.content_length if resp.status == 200 else None
        if size is None:
            raise UpstreamInvalid(f"no size for {digest} at {endpoint.registry}")
        return size
    finally:
        resp.close()


def content_length(value: str | None) -> int | None:
    if value is None or not _is_number(value.strip()):
        return None
    return int(value.strip())


def _is_number(text: str) -> bool:
    # str.isdigit() accepts "²" and other digits int() refuses.
    return text.isascii() and text.isdigit()

"""Helpers for tests of shoal's upstream client against the fake registries: an UpstreamSource
allowed to reach them, a test image, references, a hand-moved clock and a recording resolver."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult

from shoal.oci import mediatypes as mt
from shoal.oci.digest import Digest
from shoal.oci.names import Reference, make_reference
from shoal.upstream import RetryPolicy, Timeouts, UpstreamSource
from tests.fakes.registries import FakeRegistry

FAST_RETRY = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05, max_retry_after=5)
FAST_TIMEOUTS = Timeouts(connect=2, first_byte=2, read=2, operation=15)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingResolver(AbstractResolver):
    """DNS for tests: `names` map to addresses, every lookup is recorded."""

    def __init__(self, names: dict[str, str] | None = None) -> None:
        self.names = names or {}
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        if host not in self.names:
            raise OSError(f"test resolver: unknown name {host}")
        return [
            {
                "hostname": host,
                "host": self.names[host],
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        pass


@dataclass
class TestImage:
    __test__ = False  # not a test class

    manifest: bytes
    digest: Digest
    config: bytes
    config_digest: Digest
    layer: bytes
    layer_digest: Digest


LAYER = bytes(range(256)) * 4096 * 2  # 2 MiB: many chunks


def add_image(registry: FakeRegistry, tag: str = "v1", layer: bytes = LAYER) -> TestImage:
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    cdig, ldig = registry.add_blob(config), registry.add_blob(layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": "x", "digest": str(cdig), "size": len(config)},
            "layers": [{"mediaType": "y", "digest": str(ldig), "size": len(layer)}],
        }
    ).encode()
    mdig = registry.add_manifest(manifest, mt.OCI_MANIFEST, tag)
    return TestImage(manifest, mdig, config, cdig, layer, ldig)


def ref(
    registry: FakeRegistry | str, tag_or_digest: str = "v1", repo: str = "team/app"
) -> Reference:
    host = registry if isinstance(registry, str) else registry.host
    return make_reference(host, repo, tag_or_digest)


def source(*registries: FakeRegistry | str, **kwargs: Any) -> UpstreamSource:
    """An UpstreamSource allowed to reach exactly these registries, over plain HTTP."""
    hosts = [r if isinstance(r, str) else r.host for r in registries]
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("timeouts", FAST_TIMEOUTS)
    kwargs.setdefault("insecure", hosts)
    return UpstreamSource(hosts, **kwargs)


def write_config(path: Path, auths: dict[str, dict[str, str]]) -> str:
    path.write_text(json.dumps({"auths": auths}))
    return str(path)


async def read_all(blob: Any, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([c async for c in blob.open(start, blob.size if end is None else end)])

"""The upstream with configured credentials (`--upstream-credentials`): the last Source of this
node's own containerd, never of a peer or anyone else.

It is asked only after everything the cluster shares (and the anonymous upstream) missed, and
only for registries it holds credentials for. What it fetches is streamed to containerd
directly: never put in the spool, so never advertised and never joined by a peer. Once in
containerd's store, the anonymous probe decides its status like any other content's.
"""

from __future__ import annotations

from shoal.content.model import Blob, ContentKind, Descriptor, SourceKind
from shoal.oci.digest import Digest
from shoal.oci.names import Reference
from shoal.upstream import UpstreamSource


class CredentialedUpstream:
    name = SourceKind.UPSTREAM

    def __init__(self, upstream: UpstreamSource) -> None:
        self.upstream = upstream

    def holds_credentials(self, registry: str | None) -> bool:
        endpoint = self.upstream.endpoint(registry)
        if endpoint is None:
            return False
        return self.upstream.auth.credentials.lookup(endpoint.registry) is not None

    async def resolve(self, ref: Reference) -> Descriptor | None:
        if not self.holds_credentials(ref.registry):
            return None
        return await self.upstream.resolve(ref)

    async def find(self, ref: Reference, digest: Digest, kind: ContentKind) -> Blob | None:
        if not self.holds_credentials(ref.registry):
            return None
        return await self.upstream.find(ref, digest, kind)

    async def close(self) -> None:
        await self.upstream.close()

"""shoal as a careful registry client: the upstream registries as a Source."""

from shoal.upstream.allowlist import AllowList, Endpoint
from shoal.upstream.blobs import UpstreamBlob
from shoal.upstream.errors import (
    UpstreamDenied,
    UpstreamDigestMismatch,
    UpstreamError,
    UpstreamIncomplete,
    UpstreamInvalid,
    UpstreamUnavailable,
)
from shoal.upstream.source import UpstreamSource
from shoal.upstream.transport import USER_AGENT, RetryPolicy, Timeouts

__all__ = [
    "USER_AGENT",
    "AllowList",
    "Endpoint",
    "RetryPolicy",
    "Timeouts",
    "UpstreamBlob",
    "UpstreamDenied",
    "UpstreamDigestMismatch",
    "UpstreamError",
    "UpstreamIncomplete",
    "UpstreamInvalid",
    "UpstreamSource",
    "UpstreamUnavailable",
]

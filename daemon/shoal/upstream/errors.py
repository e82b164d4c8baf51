"""Why upstream could not give a usable answer.

Every error is a ConnectionError (so an OSError): code that already treats a Source's I/O failure
as "try the next source" handles these without knowing about upstream.
"""

from __future__ import annotations


class UpstreamError(ConnectionError):
    """Upstream gave no usable answer."""


class UpstreamUnavailable(UpstreamError):
    """Unreachable, timed out, 5xx or 429 after the bounded retries."""


class UpstreamDenied(UpstreamError):
    """401/403 even after answering the challenge (or no credentials for a Basic challenge)."""


class UpstreamInvalid(UpstreamError):
    """An answer that breaks the protocol: bad redirect, oversized manifest, wrong length."""


class UpstreamDigestMismatch(UpstreamInvalid):
    """Content whose bytes do not hash to the digest asked for (or announced)."""


class UpstreamIncomplete(UpstreamError):
    """A body that stayed short even after resuming it with Range."""

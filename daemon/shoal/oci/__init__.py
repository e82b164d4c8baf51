"""OCI distribution vocabulary: names, references, digests, media types, ranges and errors."""

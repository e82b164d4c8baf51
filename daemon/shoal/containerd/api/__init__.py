"""Generated gRPC stubs for the containerd API subset shoal uses (scripts/genproto)."""

"""Real components for shoal's end-to-end tests and demo, started by code.

Synchronous and subprocess-based; every started process is registered in `procs` and stopped
by `procs.stop_all()` (fixtures and an atexit hook call it).

- `procs`: start/wait/stop processes, free ports.
- `registry`: `Registry` (docker-registry 2.8) with a parsed request log.
- `containerd`: `ContainerdNode`, a private containerd 1.6 per simulated node, and `ctr`.
- `images`: deterministic OCI / Docker test images built offline, pushed with skopeo.
- `upstream`: a registry plus the standard test images pushed to it.
- `netns`: `Network` / `Namespace`, bridged network namespaces with tbf bandwidth limits.
"""

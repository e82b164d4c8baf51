"""A local multi-node demo of shoal on real parts: a registry, containerd nodes, shoal daemons.

1. A docker-registry holds a test image (built offline, pushed with skopeo).
2. Node 1's containerd pulls it from the registry.
3. The registry is stopped.
4. Node 2's containerd, its hosts.toml written by `shoal configure`, pulls the same image through
   shoal. Every byte comes from node 1's content store, verified against its digest on the way.

Run it with `sudo ./scripts/demo` (installs what is missing first). Everything stays on loopback;
every process stops at the end.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness import images
from tests.harness.containerd import ContainerdNode
from tests.harness.procs import stop_all
from tests.harness.registry import Registry
from tests.harness.shoal import ShoalDaemon


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="shoal-demo-"))
    try:
        say("starting docker-registry (upstream) and pushing a 3-layer test image")
        registry = Registry(base / "registry").start()
        image = images.large_image(48, layers=3, seed=1, name="demo")
        ref = images.push(image, registry, "demo/app", "v1")
        print(f"    {ref}  ({image.total_size / 1e6:.1f} MB, manifest {image.digest[:19]}…)")

        say("node 1: containerd pulls the image straight from the registry")
        node1 = ContainerdNode("node1", base / "node1").start()
        node1.pull(ref, via_hosts=False, plain_http=True)
        shoal1 = ShoalDaemon(node1, extra_args=["--log-level", "info"]).start()
        print(f"    node 1 holds {len(node1.content_digests())} blobs; its shoal: {shoal1.url}")

        say("stopping the registry: from now on it cannot serve a single byte")
        registry.stop()

        say("node 2: `shoal configure` points containerd at shoal, then containerd pulls")
        node2 = ContainerdNode("node2", base / "node2").start()
        subprocess.run(
            [sys.executable, "-m", "shoal.cli", "configure", "--hosts-dir", str(node2.hosts_dir),
             "--mirror", shoal1.url, "--registry", f"{registry.host}=http://{registry.host}"],
            check=True,
        )  # fmt: skip
        print((node2.hosts_dir / registry.host / "hosts.toml").read_text().rstrip())
        started = time.monotonic()
        node2.pull(ref)
        took = time.monotonic() - started
        same = all(node2.read_blob(d) == node1.read_blob(d) for d in image.blobs)
        print(f"    pulled {ref} in {took:.2f} s; byte-identical to node 1: {same}")

        say("where node 2's bytes came from (shoal's own metrics)")
        for kind in ("manifest", "blob"):
            n = shoal1.metric("shoal_requests_total", source="local", kind=kind)
            print(f"    {kind}s served from node 1's containerd store: {n:.0f}")
        print(f"    bytes served: {shoal1.metric('shoal_bytes_served_total') / 1e6:.1f} MB; "
              "registry: stopped, 0 bytes")  # fmt: skip
        return 0 if same else 1
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())

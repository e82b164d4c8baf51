"""shoal against docker-registry serving the same content, side by side, printed as ratios.

    .venv/bin/python bench/serve_vs_registry.py [--blob-mib 256] [--rounds 5] [--heads 400]
        [--containerd 2.3.7]      (or SHOAL_CONTAINERD=<version>; see tests/harness/runtime.py)

Both servers hold the same image: docker-registry (distribution 2.8) from its filesystem store,
shoal from a real containerd's content store the image was pulled into. Runs alternate between
the two so that machine noise hits both alike.

- blob GET throughput: `curl` downloads the large layer (sequentially, then 4 at once); curl is a
  C client, so the Python client's cost does not dilute the comparison.
- manifest HEAD latency by tag: sequential HEADs on one keep-alive connection; per-request p50/p99.

Goals (issue 2): throughput ratio shoal/registry >= 1.0, HEAD latency ratio <= 1.5.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness import images
from tests.harness.containerd import ContainerdNode
from tests.harness.procs import stop_all
from tests.harness.registry import Registry
from tests.harness.runtime import ENV, PRIMARY, VERSIONS, choose
from tests.harness.shoal import ShoalDaemon


def curl_seconds(url: str) -> float:
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total} %{size_download}",
         url],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    if out[0] != "200":
        raise RuntimeError(f"{url}: HTTP {out[0]}")
    return float(out[1])


def throughput(url: str, size: int, parallel: int) -> float:
    """MB/s of `parallel` simultaneous downloads of the blob."""
    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(curl_seconds, [url] * parallel))
    return size * parallel / (time.perf_counter() - start) / 1e6


def head_latencies(host: str, port: int, path: str, count: int) -> list[float]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        conn.request("HEAD", path, headers={"Accept": accept})
        resp = conn.getresponse()
        resp.read()
        samples.append(time.perf_counter() - start)
        if resp.status != 200:
            raise RuntimeError(f"HEAD {path}: {resp.status}")
    conn.close()
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blob-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--heads", type=int, default=400)
    parser.add_argument(
        "--containerd", choices=VERSIONS, default=None,
        help=f"containerd version (default ${ENV}, else {PRIMARY})",
    )  # fmt: skip
    args = parser.parse_args()
    runtime = choose(args.containerd)
    print(f"containerd {runtime.version} ({runtime.bin_dir})")

    base = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    try:
        registry = Registry(base / "registry").start()
        image = images.large_image(args.blob_mib, layers=1, seed=42, name="bench")
        ref = images.push(image, registry, "bench/big", "v1")
        node = ContainerdNode("bench", base / "node").start()
        node.pull(ref, via_hosts=False, plain_http=True)
        shoal = ShoalDaemon(node, extra_args=["--log-level", "warning"]).start()
        layer = image.layers[0]
        servers = {
            "registry": (registry.url, registry.host_ip, registry.port, ""),
            "shoal": (shoal.url, shoal.host, shoal.port, f"?ns={registry.host}"),
        }
        results: dict[str, dict[str, list[float]]] = {k: {} for k in servers}
        for url, host, port, ns in servers.values():  # warm caches and connections
            curl_seconds(f"{url}/v2/bench/big/blobs/{layer.digest}{ns}")
            head_latencies(host, port, f"/v2/bench/big/manifests/v1{ns}", 20)
        for _ in range(args.rounds):
            for name, (url, host, port, ns) in servers.items():
                blob = f"{url}/v2/bench/big/blobs/{layer.digest}{ns}"
                r = results[name]
                r.setdefault("get1", []).append(throughput(blob, layer.size, 1))
                r.setdefault("get4", []).append(throughput(blob, layer.size, 4))
                lat = head_latencies(host, port, f"/v2/bench/big/manifests/v1{ns}", args.heads)
                r.setdefault("head_p50", []).append(pct(lat, 0.5) * 1e3)
                r.setdefault("head_p99", []).append(pct(lat, 0.99) * 1e3)
    finally:
        stop_all()
        shutil.rmtree(base, ignore_errors=True)  # GBs of containerd roots

    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in results.items()}
    rows = [
        ("blob GET, 1 client (MB/s)", "get1", "higher"),
        ("blob GET, 4 clients (MB/s)", "get4", "higher"),
        ("manifest HEAD p50 (ms)", "head_p50", "lower"),
        ("manifest HEAD p99 (ms)", "head_p99", "lower"),
    ]
    print(f"\n{args.blob_mib} MiB blob, {args.rounds} rounds, {args.heads} HEADs per round "
          "(medians over rounds)")  # fmt: skip
    print(f"{'metric':32} {'registry':>10} {'shoal':>10} {'shoal/registry':>15}")
    for label, key, better in rows:
        reg, sho = med["registry"][key], med["shoal"][key]
        print(f"{label:32} {reg:10.2f} {sho:10.2f} {sho / reg:14.2f}x  ({better} is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

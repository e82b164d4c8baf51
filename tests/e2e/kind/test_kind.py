"""The Helm chart on a real three-node kind cluster.

Needs a running Docker engine, the `kind` binary and internet access (a public image is pulled).
No helm binary and no kubectl: the release is installed with helm-python-sdk (Helm's Go SDK in a
wheel) and the API is read with the `kubernetes` client shoal already depends on. One command,
from the repository root:

    .venv/bin/pytest -m kind tests/e2e/kind -v

It builds the image from the Dockerfile, creates the cluster from kind-config.yaml (containerd
with `config_path = "/etc/containerd/certs.d"`), loads the image into the nodes, installs the
chart, and then checks that:

1. every node's docker.io hosts.toml sends pulls to the node-local shoal;
2. an image pulled on one worker is served to the other worker by its peer, while that worker
   cannot reach any registry (HTTP/HTTPS egress rejected in its network namespace, which
   shoal shares through hostNetwork), and shoal's metrics count the blobs as `source="peer"`;
3. after `helm uninstall`, every node's /etc/containerd/certs.d is exactly what it was.

SHOAL_KIND_CLUSTER=<name> reuses an existing cluster (left running); SHOAL_KIND_KEEP=1 keeps a
cluster the test created. Everywhere else the test skips with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "shoal"
KIND_CONFIG = Path(__file__).with_name("kind-config.yaml")
IMAGE = "shoal:e2e"
RELEASE = "shoal"
NAMESPACE = "shoal-system"
HOSTS_DIR = "/etc/containerd/certs.d"
METRICS_URL = "http://127.0.0.1:30021/metrics"
# Small, multi-arch, not preloaded on kind nodes.
TEST_IMAGE = "docker.io/library/busybox:1.36.1"

# What an operator had before shoal: it must come back byte for byte.
SEED = {
    "docker.io/hosts.toml": (
        'server = "https://registry-1.docker.io"\n\n'
        '[host."https://registry-1.docker.io"]\n  capabilities = ["pull", "resolve"]\n'
    ),
    "registry.example.internal/hosts.toml": 'server = "https://registry.example.internal"\n',
}

pytestmark = [pytest.mark.kind, pytest.mark.slow, pytest.mark.timeout(2400)]


def run(*cmd: str, timeout: float = 600, check: bool = True, **kw: object) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def node_sh(node: str, script: str, *, check: bool = True, timeout: float = 300) -> str:
    return run("docker", "exec", node, "sh", "-c", script, check=check, timeout=timeout)


def wait_for(
    what: str, probe: Callable[[], object], timeout: float = 300, every: float = 3
) -> object:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
            if result:
                return result
        except (AssertionError, subprocess.SubprocessError) as err:
            last_error = err
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last error: {last_error}")


# --- environment -------------------------------------------------------------------------------


def missing_tools() -> str | None:
    problems = []
    if shutil.which("docker") is None:
        problems.append("docker: not on PATH")
    elif subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        problems.append("docker: no running engine")
    if shutil.which("kind") is None:
        problems.append("kind: not on PATH")
    if problems:
        return (
            "kind e2e needs a running Docker engine and the kind binary ("
            + "; ".join(problems)
            + ")"
        )
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(cluster name, kubeconfig path) of a three-node cluster with shoal's image loaded."""
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    name = os.environ.get("SHOAL_KIND_CLUSTER", "")
    created = not name
    if created:
        name = "shoal-e2e"
        run("kind", "delete", "cluster", "--name", name, check=False)
        run(
            *("kind", "create", "cluster", "--name", name, "--config", str(KIND_CONFIG)),
            *("--kubeconfig", str(kubeconfig), "--wait", "180s"),
            timeout=900,
        )
    else:
        kubeconfig.write_text(run("kind", "get", "kubeconfig", "--name", name))
    try:
        run("docker", "build", "-t", IMAGE, str(REPO), timeout=1800)
        run("kind", "load", "docker-image", IMAGE, "--name", name, timeout=900)
        yield name, kubeconfig
    finally:
        if created and not os.environ.get("SHOAL_KIND_KEEP"):
            run("kind", "delete", "cluster", "--name", name, check=False)


def nodes(name: str) -> list[str]:
    return sorted(run("kind", "get", "nodes", "--name", name).split())


# --- node helpers ------------------------------------------------------------------------------


def hosts_snapshot(node: str) -> str:
    """Paths, types, modes and content hashes under the hosts directory."""
    return node_sh(
        node,
        f"cd {HOSTS_DIR} && find . -printf '%p %y %m\\n' | sort"
        " && find . -type f -exec sha256sum {} + | sort",
    )


def seed_hosts(node: str) -> None:
    for rel, text in SEED.items():
        path = f"{HOSTS_DIR}/{rel}"
        node_sh(node, f"mkdir -p $(dirname {path}) && cat > {path} <<'EOF'\n{text}EOF")


def scrape(node: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """shoal's /metrics on `node` (host network: shoal listens in the node's namespace)."""
    text = node_sh(node, f"curl -sf {METRICS_URL}")
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if m and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def total(samples: dict, metric: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (name, ls), v in samples.items() if name == metric and want <= ls)


def repo_digest(node: str, ref: str) -> str:
    info = json.loads(node_sh(node, f"crictl inspecti -o json {ref}"))
    digests = info["status"]["repoDigests"]
    assert digests, f"{ref} on {node} has no repo digest"
    return digests[0]


# --- the test ----------------------------------------------------------------------------------


def test_chart_on_kind(cluster: tuple[str, Path]) -> None:
    import helm_python as helm
    from kubernetes import client, config

    name, kubeconfig = cluster
    all_nodes = nodes(name)
    workers = [n for n in all_nodes if "worker" in n]
    assert len(all_nodes) == 3 and len(workers) == 2, all_nodes
    seeder, consumer = workers

    for node in all_nodes:
        seed_hosts(node)
    before = {node: hosts_snapshot(node) for node in all_nodes}

    config.load_kube_config(config_file=str(kubeconfig))
    core = client.CoreV1Api()
    selector = f"app.kubernetes.io/name=shoal,app.kubernetes.io/instance={RELEASE}"
    values = {
        "image": {"repository": "shoal", "tag": "e2e", "pullPolicy": "Never"},
        "logLevel": "debug",
    }
    with helm.Config(kubeconfig_path=kubeconfig, namespace=NAMESPACE) as cfg:
        cfg.install(
            str(CHART),
            RELEASE,
            values,
            namespace=NAMESPACE,
            create_namespace=True,
            wait="watcher",
            timeout=600,
        )
        try:
            pods = core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
            assert sorted(p.spec.node_name for p in pods) == all_nodes
            assert all(p.status.phase == "Running" for p in pods)

            # 1. containerd on every node now asks shoal first.
            for node in all_nodes:
                text = node_sh(node, f"cat {HOSTS_DIR}/docker.io/hosts.toml")
                assert '[host."http://127.0.0.1:30020"]' in text, (node, text)

            # 2. Pull on one worker (through its shoal, from upstream), then on the other
            # worker with registries out of reach: only a peer can serve it.
            advertised = total(scrape(seeder), "shoal_advertised_keys")
            node_sh(seeder, f"crictl pull {TEST_IMAGE}", timeout=600)
            digest_ref = repo_digest(seeder, TEST_IMAGE)
            wait_for(
                f"{seeder} to advertise {TEST_IMAGE}",
                lambda: total(scrape(seeder), "shoal_advertised_keys") > advertised,
            )
            before_peer = total(
                scrape(consumer), "shoal_requests_total", source="peer", kind="blob"
            )
            block = "-p tcp -m multiport --dports 80,443 -j REJECT"
            try:
                node_sh(consumer, f"iptables -I OUTPUT {block}")
                node_sh(consumer, f"ip6tables -I OUTPUT {block}", check=False)
                reach = "curl -s -m 10 -o /dev/null https://registry-1.docker.io/v2/"
                assert (
                    node_sh(consumer, f"{reach} && echo open || echo blocked").strip() == "blocked"
                )
                present = f"crictl inspecti {digest_ref} >/dev/null 2>&1 && echo yes || echo no"
                assert node_sh(consumer, present).strip() == "no"
                wait_for(
                    f"{consumer} to pull {digest_ref} from its peer",
                    lambda: node_sh(consumer, f"crictl pull {digest_ref}", timeout=300),
                    timeout=300,
                    every=10,
                )
            finally:
                unblock = f"iptables -D OUTPUT {block}; ip6tables -D OUTPUT {block}"
                node_sh(consumer, unblock, check=False)
            after = scrape(consumer)
            assert total(after, "shoal_requests_total", source="peer", kind="blob") > before_peer
            assert total(after, "shoal_bytes_served_total", source="peer") > 0
        finally:
            # 3. Uninstall: every pod's preStop restores its node's hosts directory.
            cfg.uninstall(RELEASE, wait="watcher", timeout=600)

    wait_for(
        "shoal pods to terminate",
        lambda: not core.list_namespaced_pod(NAMESPACE, label_selector=selector).items,
        timeout=300,
    )
    for node in all_nodes:
        assert hosts_snapshot(node) == before[node], f"{node}: {HOSTS_DIR} not restored"

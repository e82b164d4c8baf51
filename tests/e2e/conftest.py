"""Fixtures for end-to-end tests on real containerd, docker-registry and skopeo.

Every test under tests/e2e is marked `e2e`. Missing binaries skip (with the reason) instead of
failing; network-namespace fixtures also need root. Everything a fixture starts is stopped at
teardown, also when the test failed, and a session finaliser stops whatever is left.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.harness import procs
from tests.harness.containerd import ContainerdNode
from tests.harness.netns import Network, cleanup_leftovers
from tests.harness.runtime import selected
from tests.harness.upstream import Upstream

NETNS_BINARIES = ("ip", "tc")
_HERE = Path(__file__).parent


def missing_binaries(*names: str) -> list[str]:
    return [n for n in names if shutil.which(n) is None]


def require_binaries(*names: str) -> None:
    missing = missing_binaries(*names)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} on PATH (scripts/setup.sh installs them)")


def require_containerd() -> None:
    """Skips when the run's containerd is not prepared (an explicit choice fails at start)."""
    rt = selected()
    if not rt.available():
        pytest.skip(rt.missing_reason())


def require_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    require_binaries(*NETNS_BINARIES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Remember the outcome so `tmp` can keep a failed test's logs.
    rep = yield
    if rep.when == "call":
        item.stash[_FAILED] = rep.failed
    return rep


# --- directories -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def session_tmp() -> Iterator[Path]:
    """Session-wide scratch directory (short path: unix socket paths are limited)."""
    path = Path(tempfile.mkdtemp(prefix="shoal-e2e-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


_counter = itertools.count()


@pytest.fixture
def tmp(session_tmp: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh short directory per test; kept (and its path reported) if the test failed, or
    always with SHOAL_KEEP_LOGS=1."""
    path = session_tmp / f"t{next(_counter)}"
    path.mkdir()
    yield path
    if request.node.stash.get(_FAILED, False) or os.environ.get("SHOAL_KEEP_LOGS") == "1":
        # Renaming is cheap even with big content stores; the logs outlive the session dir.
        outcome = "failed" if request.node.stash.get(_FAILED, False) else "kept"
        keep = Path(tempfile.mkdtemp(prefix=f"shoal-{outcome}-{request.node.name[:40]}-"))
        path.rename(keep / path.name)
        print(f"\nlogs of the {outcome} test kept in {keep / path.name}")
    else:
        shutil.rmtree(path, ignore_errors=True)


# --- process hygiene ---------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _stop_everything_at_exit() -> Iterator[None]:
    if os.geteuid() == 0 and shutil.which("ip"):
        cleanup_leftovers()  # namespaces/links of earlier runs that crashed
    yield
    errors = procs.stop_all()
    assert not errors, f"processes did not stop cleanly: {errors}"


# --- real components ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def registry(session_tmp: Path) -> Iterator[Upstream]:
    """Upstream docker-registry on 127.0.0.1 with `oci`, `multi` (amd64+arm64 index) and
    `docker` (schema 2) pushed as test/<key>:v1. `.refs`, `.digest(key)`, `.images[key]`,
    `.registry` (the Registry, with its request log). Session-wide: push new repos only."""
    require_binaries("docker-registry", "skopeo")
    up = Upstream.create(session_tmp / "upstream", name="upstream")
    yield up
    up.registry.stop()


@pytest.fixture(autouse=True)
def _session_registry_running(request: pytest.FixtureRequest) -> None:
    """Modules end with `stop_all()`, which also stops the session's registry: a test that
    uses it gets it started again (on its port) rather than a refused connection."""
    if "registry" in request.fixturenames:
        request.getfixturevalue("registry").registry.start()


NodeFactory = Callable[..., ContainerdNode]


@contextlib.contextmanager
def node_pool(tmp: Path) -> Iterator[NodeFactory]:
    """`make(name="node", netns=None, **kwargs) -> ContainerdNode` (started); every node made
    is stopped when the block ends. `netns` takes a Namespace or an `ip netns` name."""
    require_containerd()
    nodes: list[ContainerdNode] = []

    def make(name: str = "node", netns: object = None, **kwargs: object) -> ContainerdNode:
        ns_name = getattr(netns, "name", netns)
        node = ContainerdNode(name, tmp / f"node-{name}", ns_name, **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        return node.start()

    try:
        yield make
    finally:
        for node in reversed(nodes):
            node.cleanup()


@pytest.fixture
def node_factory(tmp: Path) -> Iterator[NodeFactory]:
    """node_pool() for one test: its nodes are stopped at teardown, also when it fails."""
    with node_pool(tmp) as make:
        yield make


@pytest.fixture
def network(tmp: Path) -> Iterator[Network]:
    """A private bridge network (auto-picked 10.213.x.0/24, bridge address `.host_ip`);
    `network.add("a")` makes namespaces. Teardown stops the harness processes inside first."""
    require_netns()
    net = Network("e2e").create()
    yield net
    net.destroy()


@pytest.fixture
def network_registry(registry: Upstream, network: Network, tmp: Path) -> Iterator[Upstream]:
    """The upstream's images served on the network's bridge address (reachable from the
    namespaces), by a second registry over the same storage."""
    up = registry.serve_on(tmp / "net-registry", network.host_ip, name="net-upstream")
    yield up
    up.registry.stop()


@pytest.fixture(autouse=True)
def _session_registry_running(request: pytest.FixtureRequest) -> None:
    """Modules end with `stop_all()`, which also stops the session's registry: a test that
    uses it gets it started again (on its port) rather than a refused connection."""
    if "registry" in request.fixturenames:
        request.getfixturevalue("registry").registry.start()

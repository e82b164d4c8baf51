"""The OCI distribution-spec conformance suite's pull checks against shoal (issue 17).

A real containerd node pulls four images (OCI, Docker schema 2, a two-platform index with every
platform, and one with 2 MiB layers) from a docker-registry, the registry is stopped, and the
suite (`tests.harness.gotools.CONFORMANCE`, built from its Go module) runs against that node's
shoal in its read-only mode: `OCI_API_PUSH=false` and the node's tags, manifest digests and
blob digests as `OCI_RO_DATA_*`. Every check it runs must pass.

How `?ns=` gets there: the suite builds each URL as `registry + "/v2/" + repo + "/manifests/" +
tag` and parses it, so the tag `oci?ns=<registry>` makes it send `…/manifests/oci?ns=<registry>`
as containerd does. Nothing sits between the suite and shoal. (Spegel's CI runs a fork of the
older suite with an `OCI_MIRROR_URL` setting for this; this version has none.) Digest requests
carry no `ns`: shoal serves what the node holds by digest whatever `ns` says.

This version of the suite writes no report when push is off, unless run in parts: its blob
groups record a status for test data they never created (a nil dereference writing
results.yaml), and read-only data that a filtered run leaves untested has a status it cannot
write ("unknown status 0"), after which it exits 0 whatever the outcome. So each group that
applies runs by itself (`OCI_FILTER_TEST`), with the read-only data only for its own group,
and the verdict comes from each run's junit.xml, never from the exit code alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import gotools, images
from tests.harness.containerd import ContainerdNode
from tests.harness.procs import HarnessError, stop_all
from tests.harness.registry import Registry, http_request
from tests.harness.shoal import ShoalDaemon

pytestmark = pytest.mark.e2e

ROOT = "OCI Conformance Test"
REPO = "conformance/repo1"
# The suite's top-level groups that a read-only registry can take part in.
GROUPS = ("ping", "read-only", "missing-manifest", "invalid-digest-format")
# Checks that cannot apply to a read-only mirror, by name below ROOT, with the reason.
NOT_APPLICABLE = {
    "sha256 blobs, sha512 blobs": "every check in them (including GET of a missing blob, Range "
    "and the empty blob) runs on blobs the suite pushes first; a pull-only mirror takes no "
    "push (shoal's Range, 416 and missing-blob answers are tested in test_local_serving.py "
    "and tests/unit/test_registry.py)",
    "empty/tag list, read-only/tag-list": "tag listing: containerd never lists tags, and a "
    "mirror lists no repository; shoal answers 404",
    "empty/referrers, read-only/referrers": "the referrers API: containerd's pulls never use "
    "it; shoal answers 404, which the spec tells clients to read as 'use the tag schema', "
    "and such tags are served as any tag",
    "read-only/push, invalid-digest-format/manifest-put": "pushes: shoal answers every write "
    "with 405 UNSUPPORTED",
    "read-only/delete, invalid-digest-format/delete": "deletes: shoal answers 405 UNSUPPORTED",
}
_DISABLED_PREFIXES = (
    "read-only/tag-list",
    "read-only/push",
    "read-only/delete",
    "read-only/referrers",
    "invalid-digest-format/manifest-put",
    "invalid-digest-format/delete",
)


@dataclass
class Node:
    registry: Registry
    shoal: ShoalDaemon
    tags: list[str]
    manifests: list[str]
    blobs: list[str]


@dataclass
class Check:
    name: str  # below ROOT, e.g. "read-only/pull/manifest-by-tag"
    status: str  # junit: passed, skipped, failure, error
    urls: list[str]
    message: str


@pytest.fixture(scope="module")
def suite() -> Path:
    try:
        return gotools.binary(gotools.CONFORMANCE)
    except HarnessError as exc:
        pytest.skip(f"the conformance suite is built from its Go module: {exc}")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("conformance")
    built: dict[str, images.TestImage] = {
        "oci": images.oci_image("conf-oci"),
        "docker": images.docker_schema2_image("conf-docker"),
        "multi": images.multiarch_index("conf-multi"),
        "large": images.large_image(4, layers=2, seed=17, name="conf-large"),
    }
    try:
        registry = Registry(base / "registry").start()
        refs = {tag: images.push(image, registry, REPO, tag) for tag, image in built.items()}
        cd = ContainerdNode("conf", base / "node").start()
        for tag, ref in refs.items():
            cd.pull(ref, via_hosts=False, plain_http=True, all_platforms=tag == "multi")
        registry.stop()  # every answer below comes from the node's content store
        shoal = ShoalDaemon(cd).start()
        manifests, blobs = [], []
        for image in built.values():
            if isinstance(image, images.Index):
                manifests.append(image.digest)
            for m in image.manifests:
                manifests.append(m.digest)
                blobs += [m.config.digest, *(layer.digest for layer in m.layers)]
        yield Node(registry, shoal, list(built), manifests, blobs)
    finally:
        stop_all()


def run_group(suite: Path, node: Node, group: str, out: Path) -> list[Check]:
    out.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "OCI_REGISTRY": f"{node.shoal.host}:{node.shoal.port}",
        "OCI_TLS": "disabled",
        "OCI_REPO1": REPO,
        "OCI_REPO2": "conformance/repo2",
        "OCI_API_PUSH": "false",
        "OCI_API_TAGS_LIST": "false",
        "OCI_API_TAGS_DELETE": "false",
        "OCI_API_MANIFESTS_DELETE": "false",
        "OCI_API_BLOBS_DELETE": "false",
        "OCI_API_REFERRER": "false",
        # Blob answers must name their digest. (Manifests too, but the suite cannot check that
        # in read-only mode: it would look at a response it never kept.)
        "OCI_API_BLOBS_DIGEST_HEADER": "true",
        "OCI_FILTER_TEST": f"{ROOT}/{group}",
        "OCI_RESULTS_DIR": str(out),
    }
    if group == "read-only":
        env["OCI_RO_DATA_TAGS"] = " ".join(f"{t}?ns={node.registry.host}" for t in node.tags)
        env["OCI_RO_DATA_MANIFESTS"] = " ".join(node.manifests)
        env["OCI_RO_DATA_BLOBS"] = " ".join(node.blobs)
    proc = subprocess.run(
        [str(suite)], env=env, cwd=out, capture_output=True, text=True, timeout=300
    )
    junit = out / "junit.xml"
    assert junit.exists(), f"the suite wrote no report ({proc.returncode}):\n{proc.stderr[-3000:]}"
    checks = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        log = case.findtext("system-err") or ""
        checks.append(
            Check(
                name=case.get("name", "").removeprefix(ROOT + "/"),
                status=case.get("status", ""),
                urls=re.findall(r"^URL: (\S+)$", log, re.M),
                message=(case.findtext("system-out") or "").strip(),
            )
        )
    failed = [c for c in checks if c.status in ("failure", "error")]
    assert proc.returncode == 0 or failed, f"suite exited {proc.returncode}:\n{proc.stderr}"
    return checks


def test_every_pull_check_passes(
    suite: Path, node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checks = [c for g in GROUPS for c in run_group(suite, node, g, tmp_path / g)]

    failed = [c for c in checks if c.status not in ("passed", "skipped")]
    assert not failed, "\n".join(f"{c.name}: {c.status} {c.urls} {c.message}" for c in failed)
    # Whatever the suite did not run is a write, a delete, tag listing or referrers, each
    # named in NOT_APPLICABLE; no pull check was left out.
    skipped = [c for c in checks if c.status == "skipped"]
    unexplained = [c.name for c in skipped if not c.name.startswith(_DISABLED_PREFIXES)]
    assert not unexplained, f"skipped without a reason: {unexplained}"

    passed = Counter(c.name for c in checks if c.status == "passed")
    pulls = "read-only/pull/"
    heads = "read-only/head/"
    n_tags, n_manifests, n_blobs = len(node.tags), len(node.manifests), len(node.blobs)
    assert passed[pulls + "manifest-by-tag"] == n_tags
    assert passed[heads + "manifest-head-by-tag"] == n_tags
    assert passed[pulls + "manifest-by-digest"] == n_manifests
    assert passed[heads + "manifest-head-by-digest"] == n_manifests
    assert passed[pulls + "blob-get"] == n_blobs
    assert passed[heads + "blob-head"] == n_blobs
    for name in ("ping", "missing-manifest/by-digest", "missing-manifest/by-tag",
                 "invalid-digest-format/manifest-get"):  # fmt: skip
        assert passed[name] == 1, name
    # Requests by tag named the registry as containerd does; the check is on the suite's own
    # record of the requests it sent.
    by_tag = [u for c in checks if c.name.endswith("-by-tag") and "missing" not in c.name
              for u in c.urls]  # fmt: skip
    assert len(by_tag) == 2 * n_tags
    assert all(f"?ns={node.registry.host}" in u for u in by_tag), by_tag

    # The answers the reasons above rely on.
    base = node.shoal.url
    digest = node.manifests[0]
    assert http_request(f"{base}/v2/{REPO}/tags/list")[0] == 404
    assert http_request(f"{base}/v2/{REPO}/referrers/{digest}")[0] == 404
    writes = [("POST", "blobs/uploads/"), ("PUT", f"manifests/{node.tags[0]}"),
              ("DELETE", f"manifests/{digest}"), ("DELETE", f"blobs/{node.blobs[0]}")]  # fmt: skip
    for method, path in writes:
        status, _, body = http_request(f"{base}/v2/{REPO}/{path}", method=method)
        assert (status, json.loads(body)["errors"][0]["code"]) == (405, "UNSUPPORTED"), path

    with capsys.disabled():
        print(f"\nOCI conformance suite {gotools.CONFORMANCE.version}, pull checks on shoal:")
        for name, count in sorted(passed.items()):
            print(f"  passed  {count:3d} x {name}")
        print(f"  {sum(passed.values())} passed, 0 failed; not applicable to a read-only mirror:")
        for names, reason in NOT_APPLICABLE.items():
            print(f"  - {names}: {reason}")

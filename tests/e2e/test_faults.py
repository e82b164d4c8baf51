"""Bad, slow and dead holders on real parts (issue 13): every pull succeeds, with at most one
failed attempt, whatever one holder does.

Three nodes (network namespaces, each with its own containerd and shoal); nodes 1 and 2 hold a
72 MiB one-layer image and node 3 pulls it through CRI `PullImage` as the kubelet does, retried
up to 3 times 1 s apart. Per trial one fault: a byte of node 1's layer file flipped after node 1
served it once intact (its verified record warm), a holder SIGSTOPped or SIGKILLed mid-body, or
node 3's containerd restarted mid-pull. `SHOAL_SOAK_TRIALS` sets the trials per fault (default
3; the full soak is `SHOAL_SOAK_TRIALS=20`). Times are printed, never asserted.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tests.harness import images
from tests.harness.cluster import PORT, Cluster, Node, wait_until
from tests.harness.cri import cri_pull
from tests.harness.netns import Network
from tests.harness.procs import HarnessError, stop_all, unix_socket_open
from tests.harness.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.slow]

TRIALS = int(os.environ.get("SHOAL_SOAK_TRIALS", "3"))
ATTEMPTS = 3  # as a kubelet retries, 1 s apart
RESYNC = 4.0


@dataclass
class Soak:
    cluster: Cluster
    image: images.TestImage
    ref: str
    results: dict[str, list[Outcome]] = field(default_factory=dict)

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes

    @property
    def registry(self) -> Registry:
        return self.cluster.registry

    @property
    def layer(self) -> str:
        return self.image.layers[0].digest


@dataclass
class Outcome:
    failed_attempts: int
    seconds: float  # the whole pull, retries included
    after_fault: float | None = None  # from the fault to the pull's end
    note: str = ""
    errors: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Soak]:
    base = tmp_path_factory.mktemp("faults")
    net = Network("faults").create()
    world: Soak | None = None
    try:
        registry = Registry(base / "registry", host_ip=net.host_ip).start()
        image = images.large_image(72, layers=1, seed=13, name="faults")
        ref = images.push(image, registry, "faults/large", "v1")
        host = registry.host
        c = Cluster(net, base, registry, shoal_args=[
            "--resync-interval", str(RESYNC), "--mirror-registries", host,
            "--upstream-insecure", host])  # fmt: skip
        for i in range(3):
            c.add_node(f"f{i + 1}")
        for node in c.nodes:
            c.start_shoal(node)
        c.wait_connected()
        world = Soak(c, image, ref)
        yield world
    finally:
        if world is not None:
            report(world)
        stop_all()
        net.destroy()


def report(world: Soak) -> None:
    print("\nfault soak: failed attempts per trial, pull seconds (after the fault)")
    for name, outcomes in world.results.items():
        fails = [o.failed_attempts for o in outcomes]
        times = [f"{o.seconds:.1f}" + (f"({o.after_fault:.1f})" if o.after_fault else "")
                 for o in outcomes]  # fmt: skip
        notes = sorted({o.note for o in outcomes if o.note})
        print(f"  {name}: {len(outcomes)} trials, failed attempts {fails}, seconds {times}"
              + (f", {notes}" if notes else ""))  # fmt: skip


# --- helpers ------------------------------------------------------------------------------


def kubelet_pull(node: Node, ref: str, up: threading.Event | None = None) -> Outcome:
    """Up to ATTEMPTS CRI pulls 1 s apart; a retry waits for containerd to be back (`up`)."""
    started = time.monotonic()
    errors: list[str] = []
    for _ in range(ATTEMPTS):
        try:
            cri_pull(node.containerd.socket, ref, timeout=180)
            return Outcome(len(errors), time.monotonic() - started, errors=errors)
        except HarnessError as exc:
            errors.append(str(exc)[:300])
        time.sleep(1.0)
        if up is not None:
            up.wait(60)
        wait_until(lambda: unix_socket_open(node.containerd.socket), 60, "containerd answers")
    return Outcome(len(errors), time.monotonic() - started, errors=errors)


def without_image(node: Node, world: Soak) -> None:
    cd = node.containerd
    if world.ref in cd.images() or cd.has_blob(world.layer):
        cd.remove_all()
    if cd.has_blob(world.layer):
        # A pull cut by a containerd restart leaves its lease behind, holding the layer.
        leases = cd.ctr("leases", "ls", "-q").stdout.split()
        if leases:
            cd.ctr("leases", "rm", "--sync", *leases)
        cd.ctr("content", "rm", world.layer, check=False)
    assert not cd.has_blob(world.layer)


def holding(node: Node, world: Soak, *, direct: bool) -> None:
    """`node` holds a good copy, pulled straight from the registry or through its shoal."""
    good = world.image.layers[0].data
    if node.containerd.has_blob(world.layer) and node.containerd.read_blob(world.layer) == good:
        return
    without_image(node, world)
    node.containerd.pull(world.ref, via_hosts=not direct, plain_http=direct)


def served_once(node: Node, world: Soak) -> None:
    """`node`'s shoal sends its copy once, whole: hashed while sent, its record now warm (the
    first answer may be a 404 while a quarantine is lifted after a re-pull)."""

    last: list[str] = []

    def whole() -> bool:
        status, _, body = node.peer_request(f"/v2/faults/large/blobs/{world.layer}")
        last[:] = [f"last answer {status}: {body[:200]!r}"]
        return status == 200 and body == world.image.layers[0].data

    try:
        wait_until(whole, 30, f"{node.ns.short_name} serves the layer intact")
    except Exception as exc:
        log = node.shoal.log_path.read_text(errors="replace")[-4000:] if node.shoal else ""
        raise AssertionError(f"{exc}; {last}; its log ends:\n{log}") from None


def advertised_by(world: Soak, *holders: Node) -> None:
    n3 = world.nodes[2]
    want = {h.ns.ip for h in holders}
    wait_until(lambda: want <= set(n3.providers(world.layer)), RESYNC + 30,
               f"{[h.ns.short_name for h in holders]} advertise the layer")  # fmt: skip


def flip_byte(node: Node, world: Soak) -> None:
    """One byte of the node's layer file changed in place, through the filesystem."""
    path = node.containerd.blob_path(world.layer)
    with open(path, "r+b") as f:
        f.seek(len(world.image.layers[0].data) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def sends_body(holder: Node, client_ip: str) -> bool:
    """Whether `holder`'s shoal is sending a body to `client_ip` now: a connection that carried
    over 1 MB and sent within the last 300 ms (idle keep-alive connections of HEADs do not)."""
    out = holder.ns.exec(["ss", "-tin", "state", "established", f"( sport = :{PORT} )"]).stdout
    lines = out.splitlines()
    for conn, info in itertools.pairwise(lines):
        if client_ip not in conn:
            continue
        sent, last = re.search(r"bytes_sent:(\d+)", info), re.search(r"lastsnd:(\d+)", info)
        if sent and int(sent.group(1)) > 1_000_000 and (last is None or int(last.group(1)) < 300):
            return True
    return False


def fresh_puller(world: Soak, *shoal_args: str) -> None:
    """Node 3 without the image, its shoal restarted: an empty spool, and no memory of
    holders from the trials before (a pull that met a bad holder would not ask it again)."""
    n3 = world.nodes[2]
    n3.shoal.stop()  # type: ignore[union-attr]
    world.cluster.start_shoal(n3, *shoal_args)
    without_image(n3, world)
    wait_until(lambda: n3.metric("shoal_peers") >= 2, 60, "node 3 sees its peers")


def pull_with_fault(world: Soak, fault: Callable[[Node], None],
                    up: threading.Event | None = None) -> tuple[Outcome, Node]:  # fmt: skip
    """Node 3 pulls on a 200 Mbit/s link; once a holder sends it the layer, `fault(holder)`."""
    n1, n2, n3 = world.nodes
    result: dict[str, Outcome] = {}
    puller = threading.Thread(target=lambda: result.update(o=kubelet_pull(n3, world.ref, up)))
    n3.ns.limit("200mbit")  # ~3 s for the layer: time to strike midway
    try:
        puller.start()
        wait_until(lambda: sends_body(n1, n3.ns.ip) or sends_body(n2, n3.ns.ip), 60,
                   "a holder sends")  # fmt: skip
        victim = n1 if sends_body(n1, n3.ns.ip) else n2
        time.sleep(0.5)  # a sixth of the way or so
        struck = time.monotonic()
        fault(victim)
        puller.join(600)
        outcome = result["o"]
        outcome.after_fault = time.monotonic() - struck
        return outcome, victim
    finally:
        n3.ns.unlimit()


def check_pulled(world: Soak, outcome: Outcome) -> None:
    n3 = world.nodes[2]
    assert outcome.failed_attempts < ATTEMPTS, outcome.errors
    assert outcome.failed_attempts <= 1, outcome.errors
    assert n3.containerd.read_blob(world.layer) == world.image.layers[0].data


def quarantines(node: Node) -> float:
    return node.metric("shoal_quarantined_total")


def sending(sig: int, victims: list[Node]) -> Callable[[Node], None]:
    def fault(holder: Node) -> None:
        victims.append(holder)
        holder.shoal.proc.signal(sig)  # type: ignore[union-attr]

    return fault


def restarting(node: Node, up: threading.Event) -> Callable[[Node], None]:
    """Restarts `node`'s containerd; `up` is clear meanwhile."""

    def fault(_: Node) -> None:
        up.clear()
        try:
            node.containerd.restart()
        finally:
            up.set()

    return fault


# --- the faults ---------------------------------------------------------------------------


@pytest.mark.parametrize("transfer", ["relay", "redirect"])
@pytest.mark.parametrize("good_copy", ["peer", "upstream"])
def test_bit_rot_on_a_holder_with_a_warm_record(soak: Soak, transfer: str, good_copy: str) -> None:
    """Node 1 served the layer once intact (through node 2's pull), then one byte of its file
    flipped. The good copy is node 2's (registry down) or the registry's (node 2 holds none)."""
    n1, n2, n3 = soak.nodes
    name = f"bit rot, {transfer}, good copy on {good_copy}"
    outcomes = soak.results.setdefault(name, [])
    try:
        for _ in range(TRIALS):
            fresh_puller(soak, "--peer-transfer", transfer)
            holding(n1, soak, direct=True)
            served_once(n1, soak)  # after a re-pull, this also lifts its quarantine
            without_image(n2, soak)
            if good_copy == "upstream":
                # Node 2 may keep the layer in its spool, as the designated fetcher of an earlier
                # trial: a restart empties it, so no peer holds a good copy. A record it left in
                # the DHT is answered 404 (asserted), which costs the puller nothing.
                n2.shoal.stop()  # type: ignore[union-attr]
                soak.cluster.start_shoal(n2)
                soak.cluster.wait_connected()
            advertised_by(soak, n1)
            if good_copy == "upstream":
                assert n2.peer_request(f"/v2/faults/large/blobs/{soak.layer}", "HEAD")[0] == 404
            else:
                wait_until(lambda: n2.ns.ip not in n3.providers(soak.layer), RESYNC + 30,
                           "node 2 withdrawn")  # fmt: skip
            if good_copy == "peer":
                soak.registry.stop()
                n2.containerd.pull(soak.ref)  # from node 1's shoal, which serves it as recorded
                advertised_by(soak, n1, n2)
            first = n3.providers(soak.layer)[0] == n1.ns.ip
            before = quarantines(n1)
            flip_byte(n1, soak)
            try:
                outcome = kubelet_pull(n3, soak.ref)
            finally:
                if good_copy == "peer":
                    soak.registry.start()
            outcome.note = f"node 1 listed first {first}"
            if quarantines(n1) > before:
                outcome.note += ", node 1 served and quarantined"
            outcomes.append(outcome)
            check_pulled(soak, outcome)
            # Node 1 found its copy bad if it sent any of it; it never serves it again.
            if quarantines(n1) > before:
                status, _, _ = n1.peer_request(f"/v2/faults/large/blobs/{soak.layer}", "HEAD")
                assert status == 404
    finally:
        n3.shoal.stop()  # type: ignore[union-attr]
        soak.cluster.start_shoal(n3)


def two_warm_holders(soak: Soak, *holders: Node) -> None:
    """Both holders have the image and served it once (their records warm); a fresh puller."""
    for holder in holders:
        holding(holder, soak, direct=True)
        served_once(holder, soak)  # after a re-pull, this also lifts a quarantine
    fresh_puller(soak)
    advertised_by(soak, *holders)


def test_holder_sigstopped_mid_body(soak: Soak) -> None:
    n1, n2, _ = soak.nodes
    outcomes = soak.results.setdefault("holder SIGSTOP mid-body", [])
    for _ in range(TRIALS):
        two_warm_holders(soak, n1, n2)
        soak.registry.stop()
        stopped: list[Node] = []
        try:
            outcome, victim = pull_with_fault(soak, sending(signal.SIGSTOP, stopped))
        finally:
            for holder in stopped:
                holder.shoal.proc.signal(signal.SIGCONT)  # type: ignore[union-attr]
            soak.registry.start()
        outcome.note = f"stopped {victim.ns.short_name}"
        outcomes.append(outcome)
        check_pulled(soak, outcome)


def test_holder_sigkilled_mid_body(soak: Soak) -> None:
    n1, n2, _ = soak.nodes
    outcomes = soak.results.setdefault("holder SIGKILL mid-body", [])
    for _ in range(TRIALS):
        two_warm_holders(soak, n1, n2)
        soak.registry.stop()
        killed: list[Node] = []
        try:
            outcome, victim = pull_with_fault(soak, sending(signal.SIGKILL, killed))
        finally:
            soak.registry.start()
            for holder in killed:
                holder.shoal.kill()  # type: ignore[union-attr]  # reaped
                soak.cluster.start_shoal(holder)
        outcome.note = f"killed {victim.ns.short_name}"
        outcomes.append(outcome)
        check_pulled(soak, outcome)


def test_containerd_restarted_mid_pull(soak: Soak) -> None:
    n1, n2, n3 = soak.nodes
    outcomes = soak.results.setdefault("puller's containerd restarted mid-pull", [])
    for _ in range(TRIALS):
        for holder in (n1, n2):
            holding(holder, soak, direct=True)
            served_once(holder, soak)  # after a re-pull, this also lifts a quarantine
        fresh_puller(soak)
        advertised_by(soak, n1, n2)
        up = threading.Event()
        up.set()
        outcome, _ = pull_with_fault(soak, restarting(n3, up), up)
        outcomes.append(outcome)
        check_pulled(soak, outcome)


def test_the_scrub_quarantines_a_changed_file_nobody_asked_for(soak: Soak) -> None:
    """The daemon's scrub on its own (every 3 s here): node 1's file changed after it was on
    record; it is withdrawn without any request for it. (Rot that leaves the file's identity
    as it was cannot be made from here: the unit tests fake that identity.)"""
    n1, _, n3 = soak.nodes
    n1.shoal.stop()  # type: ignore[union-attr]
    soak.cluster.start_shoal(n1, "--scrub-interval", "3")
    try:
        holding(n1, soak, direct=True)
        served_once(n1, soak)
        advertised_by(soak, n1)
        before = n1.metric("shoal_quarantined_total", found_by="scrub")
        flip_byte(n1, soak)
        wait_until(lambda: n1.metric("shoal_quarantined_total", found_by="scrub") > before,
                   60, "the scrub quarantined it")  # fmt: skip
        wait_until(lambda: n1.ns.ip not in n3.providers(soak.layer), 30, "node 1 withdrawn")
    finally:
        n1.shoal.stop()  # type: ignore[union-attr]
        soak.cluster.start_shoal(n1)


def test_no_tracebacks_in_any_log(soak: Soak) -> None:
    """Expected conditions (a holder gone, bytes that did not match) are one line each."""
    for node in soak.nodes:
        assert node.shoal is not None
        text = node.shoal.log_path.read_text(errors="replace")
        assert "Traceback" not in text, f"{node.ns.short_name}: {node.shoal.log_path}"

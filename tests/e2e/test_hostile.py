"""Hostile clients against a real `shoal run` on a real containerd (a real registry upstream).

- Fuzz: raw requests, valid pulls with odd parts and malformed HTTP (tests/harness/fuzz.py).
  Every connection gets an answer; none is 5xx; every error is an OCI error JSON body; shoal
  logs no error or traceback; its memory and file descriptors come back to where they were.
- Storm: 200 clients that stall (silent after connecting, trickling headers that never end,
  or never reading the blob they asked for) are all cut by shoal's deadlines within 2 minutes,
  while normal requests go on being answered (their latency is printed).

    SHOAL_FUZZ_REQUESTS=10000 .venv/bin/pytest tests/e2e/test_hostile.py -s   # the full count
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.conftest import node_pool
from tests.fakes.rawhttp import Answer, read_response
from tests.harness import fuzz, images
from tests.harness.registry import http_request
from tests.harness.shoal import ShoalDaemon
from tests.harness.upstream import Upstream

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REQUESTS = int(os.environ.get("SHOAL_FUZZ_REQUESTS", "2000"))
WORKERS = 16
REMOTE = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]  # not this node's own address


@dataclass
class Served:
    shoal: ShoalDaemon
    known: fuzz.Known
    big: str  # a 64 MiB blob's digest

    @property
    def pid(self) -> int:
        assert self.shoal.proc is not None
        return self.shoal.proc.pid

    def usage(self) -> tuple[int, int]:
        """(RSS in KiB, open file descriptors) of the shoal process."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        return rss, len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_problems(self) -> list[dict]:
        return [e for e in self.shoal.log_lines() if e.get("level") in ("error", "critical")
                or "error" in e or "Traceback" in str(e.get("msg", ""))]  # fmt: skip


@pytest.fixture(scope="module")
def served(registry: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("hostile")
    registry.registry.start()  # again, if an earlier module's stop_all() ended it
    big = images.large_image(64, layers=1, seed=5, name="hostile-big")
    big_ref = images.push(big, registry.registry, "hostile/big", "v1")
    with node_pool(base) as make:
        node = make("hostile")
        node.pull(registry.refs["oci"], via_hosts=False, plain_http=True)
        node.pull(big_ref, via_hosts=False, plain_http=True)
        host = registry.registry.host
        shoal = ShoalDaemon(node, extra_args=[
            "--mirror-registries", host, "--upstream-insecure", host, "--ready-alone", "true",
        ]).start()  # fmt: skip
        oci = registry.images["oci"]
        known = fuzz.Known(
            ns=host,
            repository="test/oci",
            tags=("v1",),
            digests=(oci.digest, *oci.blobs),
        )
        try:
            yield Served(shoal, known, big.layers[0].digest)
        finally:
            shoal.stop()


@dataclass
class Tally:
    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    empty: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    not_oci: list[str] = field(default_factory=list)


def _problem(case: fuzz.Case, what: object) -> str:
    return f"{case.family}: {case.data[:160]!r} -> {what}"


async def _one(port: int, case: fuzz.Case, bind: str, tally: Tally) -> None:
    tally.cases[case.family] += 1
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(bind, 0))
    except OSError as exc:
        tally.empty.append(_problem(case, f"connect: {exc!r}"))
        return
    try:
        try:
            writer.write(case.data)
            await writer.drain()
        except OSError:
            pass  # a server may answer and close before it took all of an oversized request
        for head in case.heads:
            try:
                answer: Answer | None = await read_response(reader, head=head, timeout=30)
                while answer is not None and 100 <= answer.status < 200:
                    answer = await read_response(reader, head=head, timeout=30)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                answer, why = None, repr(exc)
            else:
                why = "closed without an answer"
            if answer is None:
                tally.empty.append(_problem(case, why))
                return
            tally.statuses[answer.status] += 1
            if answer.status >= 500:
                tally.server_errors.append(_problem(case, answer))
            elif answer.status >= 400 and not head and answer.oci_error() is None:
                tally.not_oci.append(_problem(case, answer))
    finally:
        writer.close()


async def _fuzz(port: int, known: fuzz.Known, count: int, seed: int) -> Tally:
    """`count` cases, 16 connections at a time, a third from this node's own address."""
    gen = fuzz.cases(random.Random(seed), known)
    tally = Tally()
    todo = iter(range(count))

    async def worker(n: int) -> None:
        for i in todo:
            await _one(port, next(gen), REMOTE[(n + i) % len(REMOTE)] if i % 3 else "127.0.0.1",
                       tally)  # fmt: skip

    await asyncio.gather(*(worker(n) for n in range(WORKERS)))
    return tally


def _settle(served: Served, fds: int, timeout: float = 90) -> tuple[int, int]:
    """Usage once shoal has closed what clients left (idle connections time out)."""
    deadline = time.monotonic() + timeout
    while True:
        usage = served.usage()
        if usage[1] <= fds + 2 or time.monotonic() > deadline:
            return usage
        time.sleep(0.5)


def test_fuzzed_requests_get_oci_answers_and_leave_nothing_behind(served: Served) -> None:
    port = served.shoal.port
    asyncio.run(_fuzz(port, served.known, 300, seed=1))  # warm up: imports, caches, pools
    time.sleep(1)
    rss0, fds0 = served.usage()
    started = time.monotonic()
    tally = asyncio.run(_fuzz(port, served.known, REQUESTS, seed=2))
    took = time.monotonic() - started
    rss1, fds1 = _settle(served, fds0)
    print(f"\n{REQUESTS} fuzzed requests in {took:.0f}s: {dict(tally.cases)}; statuses "
          f"{dict(sorted(tally.statuses.items()))}; empty {len(tally.empty)}, 5xx "
          f"{len(tally.server_errors)}, non-OCI errors {len(tally.not_oci)}; RSS {rss0 // 1024} "
          f"-> {rss1 // 1024} MiB, fds {fds0} -> {fds1}")  # fmt: skip
    assert not tally.empty, tally.empty[:5]
    assert not tally.server_errors, tally.server_errors[:5]
    assert not tally.not_oci, tally.not_oci[:5]
    assert sum(tally.cases.values()) == REQUESTS
    problems = served.log_problems()
    assert not problems, problems[:3]
    assert fds1 <= fds0 + 2
    assert rss1 <= rss0 + 64 * 1024  # KiB: no leak proportional to the requests


async def _get(port: int, path: str, bind: str) -> Answer | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(bind, 0))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return await read_response(reader, timeout=30)
    finally:
        writer.close()


def _spread(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    return f"{len(ms)}, p50 {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms"


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


_ESTABLISHED = 1


@dataclass
class Stalled:
    kind: str
    sock: socket.socket
    since: float
    closed_after: float | None = None


def _stall(port: int, kind: str, bind: str, big_path: str) -> Stalled:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if kind == "unread":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((bind, 0))
    sock.connect(("127.0.0.1", port))
    if kind == "headers":
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
    elif kind == "unread":
        sock.sendall(f"GET {big_path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return Stalled(kind, sock, time.monotonic())


def test_stalled_clients_are_cut_while_others_are_served(served: Served) -> None:
    port = served.shoal.port
    known = served.known
    big_path = f"/v2/hostile/big/blobs/{served.big}?ns={known.ns}"
    tag_url = f"{served.shoal.url}/v2/{known.repository}/manifests/v1?ns={known.ns}"
    _, fds0 = served.usage()
    kinds = ["silent"] * 70 + ["headers"] * 70 + ["unread"] * 60
    stalled = [_stall(port, k, REMOTE[i % len(REMOTE)], big_path) for i, k in enumerate(kinds)]
    latencies: list[float] = []
    failures: list[object] = []
    stop = threading.Event()

    config = served.known.digests[1]
    blob_path = f"/v2/{known.repository}/blobs/{config}?ns={known.ns}"

    def normal() -> None:  # this node's containerd, as it were, asking what it asks
        while not stop.is_set():
            started = time.monotonic()
            status, headers, _ = http_request(tag_url, method="HEAD", timeout=30)
            latencies.append(time.monotonic() - started)
            if status != 200 or headers.get("docker-content-digest") is None:
                failures.append((status, headers))
            time.sleep(0.2)

    def remote() -> None:  # another node's shoal, from an address of its own
        while not stop.is_set():
            started = time.monotonic()
            answer = asyncio.run(_get(port, blob_path, "127.0.0.9"))
            remote_latencies.append(time.monotonic() - started)
            if answer is None or answer.status != 200:
                failures.append(answer)
            time.sleep(0.2)

    remote_latencies: list[float] = []
    clients = [threading.Thread(target=normal), threading.Thread(target=remote)]
    for client in clients:
        client.start()
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and any(s.closed_after is None for s in stalled):
            for s in stalled:
                if s.kind == "headers" and s.closed_after is None:
                    try:
                        s.sock.send(b"X-Trickle: 1\r\n", socket.MSG_DONTWAIT)
                    except OSError:
                        pass
                if s.closed_after is None and _tcp_state(s.sock) != _ESTABLISHED:
                    s.closed_after = time.monotonic() - s.since
            time.sleep(1)
    finally:
        stop.set()
        for client in clients:
            client.join(60)
        for s in stalled:
            s.sock.close()
    open_left = [s.kind for s in stalled if s.closed_after is None]
    by_kind = {k: max(s.closed_after or 0 for s in stalled if s.kind == k) for k in set(kinds)}
    print(f"\n200 stalled clients: closed by shoal after at most {by_kind} s; still open "
          f"{len(open_left)}; during the storm, HEADs by tag from this node: {_spread(latencies)}"
          f", blob GETs from another address: {_spread(remote_latencies)}; failed "
          f"{len(failures)}")  # fmt: skip
    assert not open_left, Counter(open_left)
    assert all(s.closed_after is not None and s.closed_after < 120 for s in stalled)
    assert not failures, failures[:3]
    _, fds1 = _settle(served, fds0)
    assert fds1 <= fds0 + 2
    assert not served.log_problems()

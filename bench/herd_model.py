"""A rollout of one image to N nodes, modelled (issue 15, item 4): the herd policy the daemon runs
(`shoal.herd.policy`), driven by a fluid model with per-node link limits, at sizes this machine
cannot hold.

    .venv/bin/python bench/herd_model.py [--nodes 16,100,1000,5000] [--fanout 0,1,2,3]
        [--rate-mbit 200] [--mib 56 --layers 4] [--plot docs/herd-model.png] [--kill-busiest]
        [--measured-16 [FANOUT=]SECONDS,...] [--node-mbps X] [--host-mbps X] [--step-ms 1]
        [--host-cores 2 --cpu-recv S --cpu-send S | --calibrate-cpu floor=S,floor_ctrd=CPU,...]

What is modelled (docs/herd.md says why each choice):
- every node has an uplink and a downlink of `--rate-mbit`, the registry an uplink of the same;
  a node's receiving is also capped by `--node-mbps` (MB/s it can receive, hash and write) and
  all nodes' together by `--host-mbps`;
- all nodes share `--host-cores` cores (one host, as in the real bench): a flow costs
  `--cpu-recv` CPU-s per MB at its child (containerd and shoal receiving) and, when its parent
  is a node, `--cpu-send` more at the parent (shoal sending), so sum(w_f * rate_f) <= cores;
- the designated fetcher (rendezvous hashing over the members) fetches the layers from the
  registry one after another in manifest order and advertises all of them at once;
- every other node asks for its layers at t ~ 0 (seeded jitter), at most `--concurrent` (3, as
  containerd) at once, in order; each ask is one round trip; the asker walks with
  `policy.Walk` over the candidates (the designated fetcher first, then up to `--dht-k` - 1
  advertisers in random order), and every node answers with its own `policy.Fanout`;
- a node advertises a blob the moment it starts receiving it; a child never has more bytes
  than its parent (cut-through); a node holds the end of a blob until its own hash matched,
  `--holdback-ms` after both it has all bytes and its parent ended the response;
- rates are max-min fair over every uplink, downlink and CPU cap (the host's cores weighted
  by each flow's CPU per byte), with cut-through as a constraint (a child caught up with its
  parent moves at most at the parent's rate);
- the cores also carry work not tied to bytes: every shoal's steady routing work
  (`--cpu-idle` per node per second) and the announcements (`--announce-rounds` batches from
  each node to each of its min(N-1, 20) closest peers, `--cpu-message` each), spread evenly
  over the rollout (`solve` re-runs the model until the rollout's length and the cores that
  work takes agree).
The fluid state advances from event to event (an ask, a stream's start or end, a catch-up),
but never by less than `--step-ms`: events closer than that share one rate computation.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "daemon"))
sys.path.insert(0, str(ROOT))

from bench import _herd_cpu  # noqa: E402
from bench._herd_cpu import REPLICATION  # noqa: E402

from shoal.herd.policy import MAX_UPSTREAM, Fanout, Slot, Walk, upstream_chain  # noqa: E402

MIB = 1 << 20
REGISTRY = -2  # a flow's parent when it comes from the registry
NONE = -1
_CHAIN_DEPTH_LIMIT = 4096  # a guard against a loop in the model's own bookkeeping


@dataclass
class Params:
    nodes: int = 16
    fanout: int = 2  # 0: unbounded, the star of today's code
    spare: int = 1
    rate_mbit: float = 200.0  # every node's uplink and downlink, and the registry's uplink
    mib: float = 56.0
    layers: int = 4
    rtt: float = 0.0005
    holdback: float = 0.001
    jitter: float = 0.005
    concurrent: int = 3
    node_mbps: float = math.inf  # MB/s a node can receive + hash + write
    host_mbps: float = math.inf  # MB/s all nodes together can (one shared host)
    host_cores: float = math.inf  # cores all nodes share (one host)
    cpu_recv: float = 0.0  # CPU-s per MB a flow costs at its child (containerd + shoal)
    cpu_send: float = 0.0  # CPU-s per MB more at its parent when that is a node (shoal)
    # CPU not tied to bytes: every shoal's steady work (routing ticks), per node per second,
    # and announcements: `announce_rounds` batches a node sends to each of its min(N-1,
    # REPLICATION) closest peers, each costing `cpu_message` CPU-s (sender and receiver).
    cpu_idle: float = 0.0
    cpu_message: float = 0.0
    announce_rounds: float = 0.0
    cpu_busy: float = 0.0  # cores taken by that work: set by `solve`, not by hand
    deadline: float = 4.0  # shoal's Deadlines: 2 s of silence, then a 2 s probe
    dead_ask: float = 0.25  # an ask to a dead node: the hedge moves on after 250 ms
    retry: float = 0.1  # everyone full, spares too: ask again after this
    dht_k: int = 20  # providers one DHT lookup returns
    step: float = 0.001
    seed: int = 1
    kill_at: float | None = None  # the busiest node (not the fetcher) dies then
    overhead: float = 0.0  # s a real pull spends off the link (manifest, the last unpack)
    max_time: float = 1e6

    @property
    def messages(self) -> float:
        """Announcements a rollout sends: each node tells its closest peers (README, "Peers")."""
        return self.announce_rounds * self.nodes * min(self.nodes - 1, REPLICATION)

    @property
    def fixed_work(self) -> float:
        """CPU-s the rollout costs besides its bytes, but the steady per-second part."""
        return self.messages * self.cpu_message


@dataclass
class Result:
    params: Params
    time: float  # until the last living node has every layer
    registry: float  # registry bytes / image
    max_sent: float  # the most any node sent / image
    depth: int  # the deepest node of any layer's tree
    failed: int  # living nodes that did not get every layer
    killed: int | None = None
    killed_streams: int = 0
    reattached: int = 0
    retries: int = 0
    steps: int = 0
    wall: float = 0.0
    sent: list[float] = field(default_factory=list, repr=False)


def solve(p: Params) -> Result:
    """Runs the model with its fixed CPU work (announcements) spread evenly over the rollout:
    the cores it takes depend on how long the rollout lasts, so a few runs find where the two
    agree."""
    if not math.isfinite(p.host_cores) or p.fixed_work <= 0:
        return Model(p).run()
    busy = 0.0
    for _ in range(8):
        r = Model(replace(p, cpu_busy=busy)).run()
        if not math.isfinite(r.time):
            return r
        new = p.fixed_work / max(r.time - p.overhead, 1e-3)
        if abs(new - busy) <= 0.005 * p.host_cores:
            return r
        busy = (busy + new) / 2  # damped: the time falls as the busy share does
    return r


def designated(names: Sequence[str], key: str) -> int:
    """Rendezvous hashing: the member whose hash with the key is highest fetches."""
    scores = [hashlib.sha256(f"{n}|{key}".encode()).digest() for n in names]
    return max(range(len(names)), key=scores.__getitem__)


class Model:
    def __init__(self, p: Params) -> None:
        self.p = p
        n, nl = p.nodes, p.layers
        self.names = [f"n{i}" for i in range(n)]
        self.ids = {s: i for i, s in enumerate(self.names)}
        self.digests = [f"sha256:layer{i}" for i in range(nl)]
        self.size = p.mib * MIB / nl
        self.rng = random.Random(p.seed)
        self.fetcher = designated(self.names, "sha256:manifest")
        self.t = 0.0
        self.heap: list[tuple[float, int, str, tuple]] = []
        self._seq = 0
        # Per node and layer.
        self.nbytes = np.zeros((n, nl))
        self.done = np.full((n, nl), math.inf)
        self.full = np.full((n, nl), math.inf)  # all bytes received
        self.inflow = np.full((n, nl), NONE, dtype=np.int64)
        self.src = np.full((n, nl), NONE, dtype=np.int64)
        self.depth = np.zeros((n, nl), dtype=np.int64)
        self.walks: dict[tuple[int, int], Walk] = {}
        self.fanouts = [Fanout(p.fanout, p.spare) for _ in range(n)]
        self.advertised: list[list[int]] = [[self.fetcher] for _ in range(nl)]
        self.is_adv = np.zeros((n, nl), dtype=bool)
        self.is_adv[self.fetcher, :] = True
        self.queue: list[list[int]] = [list(range(nl)) for _ in range(n)]
        self.dead = np.zeros(n, dtype=bool)
        # Python mirrors of what each ask reads one value at a time (numpy scalars are slow).
        self.src_of = [[NONE] * nl for _ in range(n)]
        self.holds = [[False] * nl for _ in range(n)]
        self.gone = [False] * n
        self.sent = np.zeros(n)
        self.registry_bytes = 0.0
        self.retries = 0
        self.reattached = 0
        self.waiting_end: dict[tuple[int, int], list[int]] = {}  # parent's end awaited
        # Flows: a child receiving one layer from a parent (a node or the registry).
        cap = n * nl + 64
        self.f_child = np.zeros(cap, dtype=np.int64)
        self.f_parent = np.zeros(cap, dtype=np.int64)
        self.f_layer = np.zeros(cap, dtype=np.int64)
        self.f_active = np.zeros(cap, dtype=bool)
        self.f_slot: list[Slot | None] = [None] * cap
        self.nflows = 0
        rate = p.rate_mbit * 1e6 / 8
        down = min(rate, p.node_mbps * 1e6)
        # Caps in bytes/s, the CPU's in CPU-s/s (its weights are CPU-s per byte).
        self.caps = np.concatenate(
            [np.full(n, rate), np.full(n, down), [rate, p.host_mbps * 1e6, self.cores(), math.inf]]
        )
        self.R_REG, self.R_HOST, self.R_CPU, self.R_NONE = 2 * n, 2 * n + 1, 2 * n + 2, 2 * n + 3

    def cores(self) -> float:
        """What the flows have of the host's cores: the rest does work not tied to bytes (never
        less than 5% of them, so a model drowned in it still ends)."""
        p = self.p
        busy = p.cpu_idle * p.nodes + p.cpu_busy
        return max(p.host_cores - busy, 0.05 * p.host_cores)

    # -- events ------------------------------------------------------------------------------

    def at(self, when: float, kind: str, *args: object) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (when, self._seq, kind, args))

    def run(self) -> Result:
        p, start = self.p, time.perf_counter()
        self.at(p.rtt, "registry", 0)
        for i in range(p.nodes):
            if i == self.fetcher:
                continue
            t0 = self.rng.uniform(0, p.jitter)
            for _ in range(min(p.concurrent, p.layers)):
                self.at(t0, "next_layer", i)
        if p.kill_at is not None:
            self.at(p.kill_at, "kill")
        steps = 0
        while True:
            while self.heap and self.heap[0][0] <= self.t + 1e-12:
                _, _, kind, args = heapq.heappop(self.heap)
                getattr(self, "on_" + kind)(*args)
            if self.finished() or self.t > p.max_time:
                break
            idx = np.flatnonzero(self.f_active[: self.nflows])
            if len(idx) == 0:
                if not self.heap:
                    break  # stuck: reported as failed nodes
                self.t = self.heap[0][0]
                continue
            steps += 1
            self.advance(idx)
        living = ~self.dead
        alive_done = self.done[living]
        failed = int((~np.isfinite(alive_done)).any(axis=1).sum())
        finite = alive_done[np.isfinite(alive_done)]
        image = p.mib * MIB
        return Result(
            params=p,
            time=float(finite.max()) + p.overhead if failed == 0 else math.inf,
            registry=self.registry_bytes / image,
            max_sent=float(self.sent.max()) / image,
            depth=int(self.depth.max()),
            failed=failed,
            killed=getattr(self, "killed", None),
            killed_streams=getattr(self, "killed_streams", 0),
            reattached=self.reattached,
            retries=self.retries,
            steps=steps,
            wall=time.perf_counter() - start,
            sent=list(self.sent / image),
        )

    def finished(self) -> bool:
        return bool(np.isfinite(self.done[~self.dead]).all())

    def on_registry(self, layer: int) -> None:
        """The fetcher's ordered download of `layer` starts (the one before it just ended)."""
        if self.dead[self.fetcher]:
            return
        self.new_flow(self.fetcher, REGISTRY, layer, None)

    def on_next_layer(self, node: int) -> None:
        """One of containerd's download slots on `node` is free: the next layer, in order."""
        if self.dead[node] or not self.queue[node]:
            return
        layer = self.queue[node].pop(0)
        self.start_walk(node, layer)

    def candidates(self, node: int, layer: int) -> list[str]:
        """What a lookup names: the designated fetcher first, then advertisers at random."""
        adv = self.advertised[layer]
        k = min(self.p.dht_k - 1, len(adv))
        picked = self.rng.sample(adv, k) if len(adv) > k else adv
        names = [self.names[self.fetcher]]
        names += [self.names[i] for i in picked if i not in (node, self.fetcher)]
        return names

    def start_walk(self, node: int, layer: int, failed: int | None = None) -> None:
        walk = Walk(self.candidates(node, layer), self.names[node])
        if failed is not None:
            walk.failed(self.names[failed])
        self.walks[(node, layer)] = walk
        self.on_ask(node, layer)

    def chain(self, node: int, layer: int) -> tuple[str, ...]:
        """`node`'s sources for `layer` as they are now, its source first (the daemon passes
        them on with every response; here they are read off the current tree)."""
        src_of, holds, names = self.src_of, self.holds, self.names
        out: list[str] = []
        while len(out) < MAX_UPSTREAM:
            src = src_of[node][layer]
            if src < 0 or holds[node][layer]:
                break
            out.append(names[src])
            node = src
        return upstream_chain(out[0], out[1:]) if out else ()

    def on_ask(self, node: int, layer: int) -> None:
        """`node` asks the next node of its walk for `layer`; the answer is back one RTT later."""
        if self.gone[node]:
            return
        p, walk = self.p, self.walks[(node, layer)]
        target_name = walk.next()
        if target_name is None:
            self.retries += 1
            self.at(self.t + p.retry, "rewalk", node, layer)
            return
        target = self.ids[target_name]
        if self.gone[target]:
            walk.failed(target_name)
            self.at(self.t + p.dead_ask, "ask", node, layer)
            return
        ans = self.fanouts[target].ask(
            self.digests[layer],
            self.names[node],
            upstream=self.chain(target, layer),
            reattach=walk.reattach,
        )
        if ans.loop:
            walk.failed(target_name)
            self.at(self.t + p.rtt, "ask", node, layer)
        elif ans.slot is not None:
            self.at(self.t + p.rtt, "attach", node, layer, target, ans.slot)
        else:
            walk.referred(target_name, ans.referrals)
            self.at(self.t + p.rtt, "ask", node, layer)

    def on_rewalk(self, node: int, layer: int) -> None:
        if not self.dead[node]:
            self.start_walk(node, layer)

    def on_attach(self, node: int, layer: int, parent: int, slot: Slot) -> None:
        if self.dead[node]:
            slot.release()
            return
        if self.dead[parent]:
            self.walks[(node, layer)].failed(self.names[parent])
            self.on_ask(node, layer)
            return
        self.new_flow(node, parent, layer, slot)

    def new_flow(self, child: int, parent: int, layer: int, slot: Slot | None) -> None:
        if self.nflows == len(self.f_child):
            grow = len(self.f_child)
            for name in ("f_child", "f_parent", "f_layer", "f_active"):
                arr = getattr(self, name)
                setattr(self, name, np.concatenate([arr, np.zeros(grow, dtype=arr.dtype)]))
            self.f_slot += [None] * grow
        f = self.nflows
        self.nflows += 1
        self.f_child[f], self.f_parent[f], self.f_layer[f] = child, parent, layer
        self.f_active[f] = True
        self.f_slot[f] = slot
        self.inflow[child, layer] = f
        self.src[child, layer] = parent if parent >= 0 else NONE
        self.src_of[child][layer] = parent if parent >= 0 else NONE
        self.depth[child, layer] = 0 if parent < 0 else self.depth[parent, layer] + 1
        if not self.is_adv[child, layer]:
            self.is_adv[child, layer] = True
            self.advertised[layer].append(child)
        if self.nbytes[child, layer] >= self.size:  # resumed with nothing left but the end
            self.flow_full(f, self.t)

    def flow_full(self, f: int, when: float) -> None:
        """Flow `f` delivered every byte at `when`: its response ends once its parent's did."""
        child, parent, layer = int(self.f_child[f]), int(self.f_parent[f]), int(self.f_layer[f])
        self.f_active[f] = False
        self.full[child, layer] = min(self.full[child, layer], when)
        if parent == REGISTRY:
            self.at(when, "end", f)
            if layer + 1 < self.p.layers:
                self.at(when + self.p.rtt, "registry", layer + 1)
        elif np.isfinite(self.done[parent, layer]):
            self.at(max(when, float(self.done[parent, layer])), "end", f)
        else:
            self.waiting_end.setdefault((parent, layer), []).append(f)

    def on_end(self, f: int) -> None:
        """The response of flow `f` ended: the parent's slot is free; the child checks its hash."""
        child, layer = int(self.f_child[f]), int(self.f_layer[f])
        slot = self.f_slot[f]
        if slot is not None:
            slot.release()
            self.f_slot[f] = None
        if self.dead[child] or self.inflow[child, layer] != f:
            return
        self.at(self.t + self.p.holdback, "done", child, layer)

    def on_done(self, node: int, layer: int) -> None:
        if self.dead[node] or np.isfinite(self.done[node, layer]):
            return
        self.done[node, layer] = self.t
        self.holds[node][layer] = True
        self.inflow[node, layer] = NONE
        for f in self.waiting_end.pop((node, layer), []):
            self.at(max(self.t, float(self.full[self.f_child[f], layer])), "end", f)
        if node != self.fetcher:
            self.on_next_layer(node)

    def on_kill(self) -> None:
        """The node with the most downstream streams (not the fetcher) dies."""
        alive = [i for i in range(self.p.nodes) if not self.dead[i] and i != self.fetcher]
        if not alive:
            return
        victim = max(alive, key=lambda i: self.fanouts[i].streams())
        self.killed, self.killed_streams = victim, self.fanouts[victim].streams()
        self.dead[victim] = True
        self.gone[victim] = True
        for f in range(self.nflows):
            if self.f_child[f] == victim:
                self.f_active[f] = False
                slot = self.f_slot[f]
                if slot is not None:
                    slot.release()
            elif self.f_parent[f] == victim and self.f_active[f]:
                self.f_active[f] = False
                self.lost_source(f)
        for layer in range(self.p.layers):
            for f in self.waiting_end.pop((victim, layer), []):
                self.lost_source(f)

    def lost_source(self, f: int) -> None:
        child, layer = int(self.f_child[f]), int(self.f_layer[f])
        self.inflow[child, layer] = NONE
        self.src[child, layer] = NONE
        self.src_of[child][layer] = NONE
        self.reattached += 1
        self.at(self.t + self.p.deadline, "detect", child, layer, int(self.f_parent[f]))

    def on_detect(self, node: int, layer: int, gone: int) -> None:
        """The progress deadline ran out: ask again, resuming from the bytes held (Range)."""
        if not self.dead[node] and not np.isfinite(self.done[node, layer]):
            self.start_walk(node, layer, failed=gone)

    # -- the fluid step ----------------------------------------------------------------------

    def advance(self, idx: np.ndarray) -> None:
        p, size = self.p, self.size
        child, parent, layer = self.f_child[idx], self.f_parent[idx], self.f_layer[idx]
        m = len(idx)
        b = self.nbytes[child, layer]
        from_reg = parent == REGISTRY
        pn = np.where(from_reg, 0, parent)
        pb = np.where(from_reg, size, self.nbytes[pn, layer])
        pfull = from_reg | (pb >= size)
        ahead = ~pfull & (b > pb + 1.0)
        caught = ~pfull & ~ahead & (b >= pb - 1.0)
        pos = np.full(self.nflows + 1, m, dtype=np.int64)  # global flow -> position, m: none
        pos[idx] = np.arange(m)
        anc_global = np.where(caught, self.inflow[pn, layer], -1)
        anc = np.where(anc_global >= 0, pos[anc_global], m)
        fixed0 = ahead | (caught & (anc == m))
        anc = np.where(caught, anc, m)
        rate = self.max_min(parent, child, anc, fixed0)
        # How far to go: to the next event, a stream's end or a catch-up, but at least a step.
        horizon = self.heap[0][0] - self.t if self.heap else math.inf
        moving = rate > 0
        if moving.any():
            horizon = min(horizon, float(((size - b[moving]) / rate[moving]).min()))
        # A parent's own incoming rate (0 when it has none): how fast a gap behind it closes.
        pin = np.where(~pfull, self.inflow[pn, layer], -1)
        prate = np.append(rate, 0.0)[np.where(pin >= 0, pos[np.maximum(pin, 0)], m)]
        closing = rate - prate
        behind = ~pfull & ~caught & ~ahead & (closing > 0)
        if behind.any():
            horizon = min(horizon, float(((pb[behind] - b[behind]) / closing[behind]).min()))
        dt = max(horizon, p.step)
        if not math.isfinite(dt):
            dt = p.step
        new = np.minimum(b + rate * dt, size)
        self.nbytes[child, layer] = new
        node_parent = ~from_reg
        for _ in range(_CHAIN_DEPTH_LIMIT):  # cut-through: never past the parent's bytes
            cap = np.where(node_parent, self.nbytes[pn, layer], size)
            clipped = np.maximum(b, np.minimum(new, cap))
            if np.array_equal(clipped, new):
                break
            new = clipped
            self.nbytes[child, layer] = new
        got = new - b
        self.registry_bytes += float(got[from_reg].sum())
        np.add.at(self.sent, parent[node_parent], got[node_parent])
        t0 = self.t
        self.t = t0 + dt
        ended = np.flatnonzero(new >= size - 1e-6)
        if len(ended):
            with np.errstate(divide="ignore"):
                at = t0 + (size - b[ended]) / rate[ended]
            at = np.minimum(np.where(np.isfinite(at), at, self.t), self.t)
            pfull_at = np.where(from_reg[ended], -math.inf, self.full[pn[ended], layer[ended]])
            at = np.clip(np.maximum(at, pfull_at), t0, self.t)
            for j in np.argsort(at, kind="stable"):
                self.flow_full(int(idx[ended[j]]), float(at[j]))

    def max_min(
        self, parent: np.ndarray, child: np.ndarray, anc: np.ndarray, fixed0: np.ndarray
    ) -> np.ndarray:
        """Max-min fair rates by progressive filling; a caught-up flow (`anc`: the position of
        its parent's incoming flow, m if none) freezes when that flow freezes. A flow takes
        weight x its rate of each resource it crosses: 1 of the links and `--host-mbps`, its
        CPU per byte of the host's cores."""
        p, m, n = self.p, len(parent), self.p.nodes
        up = np.where(parent == REGISTRY, self.R_REG, parent)
        down = n + child
        rows = [up, down]
        weights = [np.ones(m), np.ones(m)]
        if math.isfinite(p.host_mbps):
            rows.append(np.full(m, self.R_HOST))
            weights.append(np.ones(m))
        if math.isfinite(p.host_cores):
            rows.append(np.full(m, self.R_CPU))
            cpu = p.cpu_recv + np.where(parent == REGISTRY, 0.0, p.cpu_send)
            weights.append(cpu / 1e6)
        res, wts = np.stack(rows), np.stack(weights)
        crosses = wts > 0  # a resource a flow takes nothing of cannot freeze it
        nres = len(self.caps)
        jumps = [np.append(anc, m)]
        while (jumps[-1] != m).any() and len(jumps) < 24:
            j = jumps[-1]
            jumps.append(j[j])

        def closure(mask: np.ndarray) -> np.ndarray:
            a = np.append(mask, False)
            for j in jumps:
                a = a | a[j]
            return a[:m]

        rate = np.zeros(m)
        frozen = closure(fixed0)
        load = np.zeros(nres)
        for _ in range(10 * m + 10):
            act = ~frozen
            if not act.any():
                break
            # What one more byte/s for every active flow takes of each resource.
            per = np.zeros(nres)
            for r, w in zip(res, wts, strict=True):
                per += np.bincount(r[act], weights=w[act], minlength=nres)
            with np.errstate(divide="ignore", invalid="ignore"):
                level = np.where(per > 0, (self.caps - load) / per, math.inf)
            lam = float(level.min())
            if not math.isfinite(lam):  # nothing limits them (no such flows in practice)
                rate[act] = 0.0
                break
            sat = level <= lam * (1 + 1e-9) + 1e-9
            newly = act & (sat[res] & crosses).any(axis=0)
            newly = closure(newly) & act
            rate[newly] = lam
            for r, w in zip(res, wts, strict=True):
                load += np.bincount(r[newly], weights=w[newly] * lam, minlength=nres)
            frozen |= newly
        return rate


# -- the table, the plot, the command line ---------------------------------------------------


def design(fanout: int) -> str:
    return "star (today)" if fanout == 0 else f"tree, fanout {fanout}"


def parse_measured(text: str) -> dict[int, float]:
    """`[FANOUT=]SECONDS,...`; a bare number is the daemon's default fanout."""
    from shoal.herd.policy import DEFAULT_FANOUT

    out: dict[int, float] = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.rpartition("=")
        out[int(k) if k else DEFAULT_FANOUT] = float(v)
    return out


def plot(results: dict[tuple[int, int], Result], alone: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for fanout in sorted({f for _, f in results}):
        pts = sorted((n, r.time) for (n, f), r in results.items() if f == fanout)
        ax.plot(*zip(*pts, strict=True), marker="o", label=design(fanout))
    ax.axhline(alone, color="grey", linestyle=":", label="one node alone")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes pulling at once")
    ax.set_ylabel("rollout time, s (last node has every layer)")
    p = next(iter(results.values())).params
    ax.set_title(
        f"herd model: {p.mib:g} MiB in {p.layers} layers, every link {p.rate_mbit:g} Mbit/s",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def calibration(
    c: dict[str, float], cost: _herd_cpu.CpuCost, image_mb: float, overhead: float, link: float
) -> str:
    """What the calibration took from which phase of the bench."""
    nodes = c["nodes"]
    if "pair_relay" in c:
        ctrd = f"the pair: {c['pair_ctrd']:g} CPU-s for 2 images"
        recv = f"the pair's receiving node: {c['pair_recv']:g} CPU-s"
        send = f"the pair's relay: {c['pair_relay']:g} CPU-s, {c['pair_sent']:g} images sent"
    else:
        which, senders = ("pair", 2) if "pair_shoal" in c else ("star", nodes)
        ctrd = f"floor: {c['floor_ctrd']:g} CPU-s for {nodes:g} images in {c['floor']:g} s"
        recv = f"1 node: {c['alone_shoal']:g} CPU-s"
        send = (f"{which}: {c[which + '_shoal']:g} CPU-s, "
                f"{senders * cost.shoal_recv * image_mb:.1f} of them receiving, "
                f"{c[which + '_sent']:g} images sent to peers")  # fmt: skip
    lines = [
        f"calibrated ({image_mb:.1f} MB image), CPU-s per MB:",
        f"  containerd receiving {cost.ctrd:.5f} ({ctrd})",
        f"  shoal receiving {cost.shoal_recv:.5f} ({recv})",
        f"  shoal sending {cost.send:.5f} ({send})",
        f"  a flow: {cost.recv:.5f} at its child, + {cost.send:.5f} at a node parent; "
        f"{cost.cores:g} cores shared",
    ]
    if "idle" in c:
        lines += [
            f"  besides the bytes: {cost.idle:.4f} CPU-s per node per s (idle cluster: "
            f"{c['idle']:g} CPU-s/s, routing {c['idle_routing']:g})",
            f"  {cost.message * 1e3:.2f} ms CPU per announcement (star: {c['star_msgs']:g} "
            f"messages, routing {c['star_routing']:g} CPU-s in {c['star']:g} s), "
            f"{cost.rounds:.2f} rounds per node and peer",
        ]
    lines.append(f"  overhead {overhead:.2f} s (1 node measured {c['alone']:g} s, on the link "
                 f"{link:.2f} s)")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", default="16,100,1000,5000")
    ap.add_argument("--fanout", default="0,1,2,3", help="0: the star (today's code)")
    ap.add_argument("--rate-mbit", type=float, default=200.0)
    ap.add_argument("--mib", type=float, default=56.0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rtt-ms", type=float, default=0.5)
    ap.add_argument("--holdback-ms", type=float, default=1.0, help="per hop, the end held back")
    ap.add_argument("--jitter-ms", type=float, default=5.0)
    ap.add_argument("--concurrent", type=int, default=3, help="containerd's layer downloads")
    ap.add_argument(
        "--node-mbps",
        type=float,
        default=math.inf,
        help="MB/s one node can receive, hash and write (default: no limit)",
    )
    ap.add_argument(
        "--host-mbps",
        type=float,
        default=math.inf,
        help="MB/s all nodes together can (they share one host's cores)",
    )
    ap.add_argument(
        "--overhead-s",
        type=float,
        default=0.0,
        help="s a real pull spends off the link, added to every node's finish",
    )
    ap.add_argument(
        "--host-cores",
        type=float,
        default=math.inf,
        help="cores all nodes share (default: no CPU limit)",
    )
    ap.add_argument(
        "--cpu-recv",
        type=float,
        default=0.0,
        help="CPU-s per MB a flow costs at its child (containerd + shoal receiving)",
    )
    ap.add_argument(
        "--cpu-send",
        type=float,
        default=0.0,
        help="CPU-s per MB a flow costs at its parent, when that is a node (shoal sending)",
    )
    ap.add_argument(
        "--cpu-idle",
        type=float,
        default=0.0,
        help="CPU-s per node per second not tied to bytes (routing ticks)",
    )
    ap.add_argument("--cpu-message", type=float, default=0.0, help="CPU-s per announcement message")
    ap.add_argument(
        "--announce-rounds",
        type=float,
        default=0.0,
        help="announcement batches each node sends each of its closest peers per rollout",
    )
    ap.add_argument(
        "--calibrate-cpu",
        default="",
        help="floor=S,floor_ctrd=CPU,alone=S,alone_shoal=CPU,star_shoal=CPU,star_sent=X"
        "[,pair_...,idle=...,nodes=16,cores=2]: the real bench's floor, 1-node, pair and star "
        "phases set the CPU costs, --host-cores and --overhead-s (docs/herd.md; bench/herd.py "
        "prints this)",
    )
    ap.add_argument(
        "--deadline",
        type=float,
        default=4.0,
        help="progress deadline: silence 2 s + probe 2 s (shoal's Deadlines)",
    )
    ap.add_argument("--step-ms", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--kill-busiest",
        action="store_true",
        help="also: mid-rollout the node with the most streams dies",
    )
    ap.add_argument("--measured-16", default="", help="[FANOUT=]SECONDS,...: the real bench")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of rollout time against N")
    a = ap.parse_args(argv)

    def params(nodes: int, fanout: int, **kw: float | None) -> Params:
        return Params(
            nodes=nodes, fanout=fanout, rate_mbit=a.rate_mbit, mib=a.mib, layers=a.layers,
            rtt=a.rtt_ms / 1e3, holdback=a.holdback_ms / 1e3, jitter=a.jitter_ms / 1e3,
            concurrent=a.concurrent, node_mbps=a.node_mbps, host_mbps=a.host_mbps,
            host_cores=a.host_cores, cpu_recv=a.cpu_recv, cpu_send=a.cpu_send,
            cpu_idle=a.cpu_idle, cpu_message=a.cpu_message, announce_rounds=a.announce_rounds,
            deadline=a.deadline, step=a.step_ms / 1e3, seed=a.seed, overhead=a.overhead_s,
            **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    if a.calibrate_cpu:
        try:
            c = _herd_cpu.parse(a.calibrate_cpu)
        except ValueError as e:
            ap.error(str(e))
        image_mb = a.mib * MIB / 1e6
        cost = _herd_cpu.costs(c, image_mb)
        a.host_cores, a.cpu_recv, a.cpu_send = cost.cores, cost.recv, cost.send
        a.cpu_idle, a.cpu_message, a.announce_rounds = cost.idle, cost.message, cost.rounds
        link_alone = solve(params(1, 0)).time - a.overhead_s
        a.overhead_s = max(0.0, c["alone"] - link_alone)
        print(calibration(c, cost, image_mb, a.overhead_s, link_alone))

    sizes = [int(x) for x in a.nodes.split(",")]
    fanouts = [int(x) for x in a.fanout.split(",")]
    started = time.perf_counter()
    alone = solve(params(1, 0)).time
    besides = (
        f"; besides the bytes {a.cpu_idle:g} CPU-s per node per s and {a.cpu_message:g} per "
        f"announcement, {a.announce_rounds:g} rounds"
        if a.cpu_idle or a.cpu_message
        else ""
    )
    print(
        f"herd model: {a.mib:g} MiB image in {a.layers} layers; every uplink and downlink "
        f"{a.rate_mbit:g} Mbit/s (the registry's uplink too); RTT {a.rtt_ms:g} ms, hold-back "
        f"{a.holdback_ms:g} ms per hop, {a.concurrent} layer downloads per node, node CPU "
        f"{a.node_mbps:g} MB/s, host {a.host_mbps:g} MB/s, {a.host_cores:g} cores (CPU-s/MB "
        f"{a.cpu_recv:g} receiving, {a.cpu_send:g} sending), step {a.step_ms:g} ms, seed {a.seed}"
        + besides
    )
    print(f"one node alone: {alone:.2f} s\n")
    results: dict[tuple[int, int], Result] = {}
    head = (f"{'design':<15} {'N':>5} {'time s':>9} {'x alone':>8} {'x N=' + str(sizes[0]):>8} "
            f"{'registry':>9} {'max sent':>9} {'depth':>5} {'model s':>8}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for fanout in fanouts:
        for n in sizes:
            r = solve(params(n, fanout))
            results[(n, fanout)] = r
            base = results[(sizes[0], fanout)].time
            print(
                f"{design(fanout):<15} {n:>5} {r.time:>9.2f} {r.time / alone:>7.2f}x "
                f"{r.time / base:>7.2f}x {r.registry:>8.2f}x {r.max_sent:>8.2f}x {r.depth:>5} "
                f"{r.wall:>8.1f}" + (f"  {r.failed} nodes FAILED" if r.failed else "")
            )
        print()
    trees = [f for f in fanouts if f > 0]
    for want, limit in ((1000, 1.5), (5000, 2.0)):
        if want in sizes and 16 in sizes:
            for f in trees:
                ratio = results[(want, f)].time / results[(16, f)].time
                ok = "ok" if ratio <= limit else "MISSED"
                print(f"must-show: {design(f)}, N={want} / N=16 = {ratio:.2f}x "
                      f"(<= {limit}x: {ok})")  # fmt: skip
    if a.measured_16 and 16 in sizes:
        for f, measured in parse_measured(a.measured_16).items():
            if (16, f) in results:
                model = results[(16, f)].time
                off = model / measured - 1
                ok = "ok" if abs(off) <= 0.25 else "MISSED"
                print(f"16 nodes, {design(f)}: model {model:.2f} s, measured {measured:.2f} s, "
                      f"{off:+.0%} (within 25%: {ok})")  # fmt: skip
    if a.kill_busiest:
        print("\nkill the busiest node (not the fetcher) at mid-rollout:")
        for f in trees:
            for n in sizes:
                ref = results[(n, f)]
                r = solve(params(n, f, kill_at=(ref.time - a.overhead_s) / 2))
                print(
                    f"{design(f):<15} {n:>5} {r.time:>9.2f} s, {r.time - ref.time:+.2f} s; "
                    f"node with {r.killed_streams} streams killed, {r.reattached} streams "
                    f"re-attached, {r.failed} living nodes failed"
                )
    if a.plot:
        plot(results, alone, a.plot)
        print(f"\nplot: {a.plot}")
    print(f"model run time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

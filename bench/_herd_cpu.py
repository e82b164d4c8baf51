"""The herd model's CPU calibration (docs/herd.md, "Against the real bench"): what a flow costs
the host's cores per MB, from bench/herd.py's floor, 1-node and star phases, never from the tree
phase the model is checked against. bench/herd.py prints the model's command line with it."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

KEYS = ("floor", "floor_ctrd", "alone", "alone_shoal", "star_shoal", "star_sent")
# The pair phase (two nodes, one relaying the image to the other as it arrives) measures the
# sending cost at about a tree's per-stream rate; when given, it is used instead of the star's.
PAIR = ("pair_shoal", "pair_sent")
DEFAULTS = {"nodes": 16.0, "cores": 2.0}


@dataclass(frozen=True)
class CpuCost:
    """CPU-s per MB (1e6 bytes) of image moved, and the cores all nodes share."""

    ctrd: float  # containerd receiving, unpacking
    shoal_recv: float  # a shoal receiving (from the registry or a peer) and serving containerd
    send: float  # a shoal sending to a peer
    cores: float

    @property
    def recv(self) -> float:
        """What a flow costs at its child."""
        return self.ctrd + self.shoal_recv


def parse(text: str) -> dict[str, float]:
    """`floor=S,floor_ctrd=CPU,alone=S,alone_shoal=CPU,star_shoal=CPU,star_sent=X[,nodes=16,
    cores=2]`: every key of KEYS, the others optional."""
    out = dict(DEFAULTS)
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in (*KEYS, *PAIR, *DEFAULTS):
            raise ValueError(f"--calibrate-cpu: {part!r} is not one of {', '.join(KEYS)}=...")
        out[key] = float(value)
    missing = [k for k in KEYS if k not in out]
    if sum(k in out for k in PAIR) == 1:
        missing += [k for k in PAIR if k not in out]
    if missing:
        raise ValueError(f"--calibrate-cpu: missing {', '.join(missing)}")
    return out


def costs(c: dict[str, float], image_mb: float) -> CpuCost:
    """The floor's containerd CPU over its N images; the 1-node phase's shoal over one image;
    what the pair's (else the star's) shoals spent beyond their receives, over the images they
    sent to peers."""
    nodes = c["nodes"]
    ctrd = c["floor_ctrd"] / (nodes * image_mb)
    shoal_recv = c["alone_shoal"] / image_mb
    senders, sent, spent = (
        (2, c["pair_sent"], c["pair_shoal"]) if "pair_shoal" in c
        else (nodes, c["star_sent"], c["star_shoal"])
    )  # fmt: skip
    sent_mb = sent * image_mb
    beyond = spent - senders * shoal_recv * image_mb
    send = max(0.0, beyond / sent_mb) if sent_mb > 0 else 0.0
    return CpuCost(ctrd=ctrd, shoal_recv=shoal_recv, send=send, cores=c["cores"])


def command(
    *,
    nodes: int,
    fanout: int,
    floor: tuple[float, float],  # seconds, containerd CPU-s
    alone: tuple[float, float],  # seconds, shoal CPU-s
    star: tuple[float, float, float],  # seconds, shoal CPU-s, images the shoals sent to peers
    tree: float,  # seconds
    pair: tuple[float, float] | None = None,  # shoal CPU-s, images the shoals sent to peers
    extra: tuple[str, ...] = (),
) -> str:
    """The bench/herd_model.py line that checks one bench run's tree and star times (the
    star's CPU sets the send cost; its time, which the links bound, is still checked)."""
    cal = (
        f"floor={floor[0]:.2f},floor_ctrd={floor[1]:.2f},alone={alone[0]:.2f},"
        f"alone_shoal={alone[1]:.2f},star_shoal={star[1]:.2f},star_sent={star[2]:.2f}"
        + (f",pair_shoal={pair[0]:.2f},pair_sent={pair[1]:.2f}" if pair else "")
        + (f",nodes={nodes}" if nodes != DEFAULTS["nodes"] else "")
    )
    args = [
        "bench/herd_model.py",
        "--nodes",
        str(nodes),
        "--fanout",
        f"0,{fanout}",
        *extra,
        "--calibrate-cpu",
        cal,
        "--measured-16",
        f"{fanout}={tree:.2f},0={star[0]:.2f}",
    ]
    return shlex.join(args)

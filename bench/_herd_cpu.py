"""The herd model's CPU calibration (docs/herd.md, "Against the real bench"): what a flow costs
the host's cores per MB, and what the shoals spend besides (steady routing work, announcement
messages), from bench/herd.py's floor, 1-node, pair and star phases, never from the tree phase
the model is checked against. bench/herd.py prints the model's command line with it."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

KEYS = ("floor", "floor_ctrd", "alone", "alone_shoal", "star_shoal", "star_sent")
# The pair phase (two nodes, one relaying the image to the other as it arrives) measures the
# sending cost at about a tree's per-stream rate; when given, it is used instead of the star's.
PAIR = ("pair_shoal", "pair_sent")
# The pair per node: the relaying shoal's CPU, the receiving one's, both containerds'. They set
# all three per-MB costs (a receive is what the receiving node spent; a send, what the relay
# spent beyond its own receive), containerd's at a capped link's pace as in a tree.
PAIR_NODES = ("pair_relay", "pair_recv", "pair_ctrd")
# CPU not tied to bytes: the shoals' CPU-s per second (all of it, and their routing threads')
# on a settled idle cluster of `nodes`, measured before the star's pulls; the star's time,
# routing threads' CPU-s and announcement messages, whose routing beyond idle sets the cost of
# one message.
ROUTING = ("idle", "idle_routing", "star", "star_routing", "star_msgs")
REPLICATION = 20  # peers each record goes to (shoal's routing replication factor)
DEFAULTS = {"nodes": 16.0, "cores": 2.0}


@dataclass(frozen=True)
class CpuCost:
    """CPU-s per MB (1e6 bytes) of image moved, and the cores all nodes share."""

    ctrd: float  # containerd receiving, unpacking
    shoal_recv: float  # a shoal receiving (from the registry or a peer) and serving containerd
    send: float  # a shoal sending to a peer
    cores: float
    idle: float = 0.0  # CPU-s per second per node, whatever moves
    message: float = 0.0  # CPU-s per announcement message
    rounds: float = 0.0  # announcement batches per node and peer in one rollout

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
        if not sep or key not in (*KEYS, *PAIR, *PAIR_NODES, *ROUTING, *DEFAULTS):
            raise ValueError(f"--calibrate-cpu: {part!r} is not one of {', '.join(KEYS)}=...")
        out[key] = float(value)
    missing = [k for k in KEYS if k not in out]
    for group in (PAIR, PAIR_NODES, ROUTING):
        if 0 < sum(k in out for k in group) < len(group):
            missing += [k for k in group if k not in out]
    if "pair_relay" in out and "pair_sent" not in out:
        missing += ["pair_sent"]
    if missing:
        raise ValueError(f"--calibrate-cpu: missing {', '.join(missing)}")
    return out


def costs(c: dict[str, float], image_mb: float) -> CpuCost:
    """Per MB: the floor's containerd CPU over its N images; the 1-node phase's shoal over one
    image; what the pair's (else the star's) shoals spent beyond their receives, over the
    images they sent to peers. With the pair per node, all three from the pair alone. With the
    routing figures, the steady CPU per node and second, and the CPU of one announcement."""
    nodes = c["nodes"]
    ctrd = c["floor_ctrd"] / (nodes * image_mb)
    shoal_recv = c["alone_shoal"] / image_mb
    senders, sent, spent = (
        (2, c["pair_sent"], c["pair_shoal"]) if "pair_shoal" in c
        else (nodes, c["star_sent"], c["star_shoal"])
    )  # fmt: skip
    sent_mb = sent * image_mb
    beyond = spent - senders * shoal_recv * image_mb
    if "pair_relay" in c:
        ctrd = c["pair_ctrd"] / (2 * image_mb)
        shoal_recv = c["pair_recv"] / image_mb
        beyond = c["pair_relay"] - c["pair_recv"]
    send = max(0.0, beyond / sent_mb) if sent_mb > 0 else 0.0
    idle = message = rounds = 0.0
    if "idle" in c:
        idle = c["idle"] / nodes
        message = max(0.0, c["star_routing"] - c["idle_routing"] * c["star"]) / c["star_msgs"]
        rounds = c["star_msgs"] / (nodes * min(nodes - 1, REPLICATION))
    return CpuCost(ctrd, shoal_recv, send, c["cores"], idle, message, rounds)


def command(
    *,
    nodes: int,
    fanout: int,
    floor: tuple[float, float],  # seconds, containerd CPU-s
    alone: tuple[float, float],  # seconds, shoal CPU-s
    star: tuple[float, float, float],  # seconds, shoal CPU-s, images the shoals sent to peers
    tree: float,  # seconds
    pair: tuple[float, float] | None = None,  # shoal CPU-s, images the shoals sent to peers
    pair_nodes: tuple[float, float, float] | None = None,  # relay, receiver, containerds CPU-s
    routing: tuple[float, float, float, float] | None = None,  # idle/s, idle routing/s,
    # the star's routing CPU-s and announcement messages
    extra: tuple[str, ...] = (),
) -> str:
    """The bench/herd_model.py line that checks one bench run's tree and star times (the
    star's CPU sets the send cost; its time, which the links bound, is still checked)."""
    cal = (
        f"floor={floor[0]:.2f},floor_ctrd={floor[1]:.2f},alone={alone[0]:.2f},"
        f"alone_shoal={alone[1]:.2f},star_shoal={star[1]:.2f},star_sent={star[2]:.2f}"
        + (f",pair_shoal={pair[0]:.2f},pair_sent={pair[1]:.2f}" if pair else "")
        + (
            f",pair_relay={pair_nodes[0]:.2f},pair_recv={pair_nodes[1]:.2f},"
            f"pair_ctrd={pair_nodes[2]:.2f}"
            if pair_nodes
            else ""
        )
        + (
            f",idle={routing[0]:.3f},idle_routing={routing[1]:.3f},star={star[0]:.2f},"
            f"star_routing={routing[2]:.2f},star_msgs={routing[3]:.0f}"
            if routing
            else ""
        )
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

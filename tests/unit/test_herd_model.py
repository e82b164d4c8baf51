"""The herd model (bench/herd_model.py) on small herds: the shapes the policy must give."""

from __future__ import annotations

import argparse
import shlex

import numpy as np
import pytest
from bench import _herd_cpu, herd, herd_model
from bench.herd_model import MIB, REGISTRY, Model, Params, Result


def run(**kw: float | int | None) -> Result:
    return Model(Params(mib=8, layers=4, **kw)).run()  # type: ignore[arg-type]


def test_the_star_has_one_node_send_the_image_to_everyone() -> None:
    r = run(nodes=8, fanout=0)
    assert r.failed == 0
    assert r.max_sent == pytest.approx(7.0, rel=1e-6)
    assert sorted(r.sent)[-2] == 0  # nobody else sent a byte
    assert r.registry == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("fanout", [1, 2, 3])
def test_a_tree_bounds_what_any_node_sends(fanout: int) -> None:
    r = run(nodes=24, fanout=fanout)
    assert r.failed == 0
    assert r.max_sent <= fanout + 1e-6
    assert r.registry == pytest.approx(1.0, rel=1e-6)


def test_a_tree_is_faster_than_the_star() -> None:
    assert run(nodes=24, fanout=2).time < run(nodes=24, fanout=0).time / 3


def test_killing_the_busiest_node_midway_still_completes_everyone() -> None:
    base = run(nodes=24, fanout=2)
    r = run(nodes=24, fanout=2, kill_at=base.time / 2)
    assert r.killed is not None and r.killed_streams > 0 and r.reattached > 0
    assert r.failed == 0
    assert base.time < r.time < base.time + 2 * Params().deadline
    assert r.registry == pytest.approx(1.0, rel=1e-6)


def test_the_host_cores_are_filled_with_each_flow_weighted_by_its_cpu_per_byte() -> None:
    # Three nodes, 25 MB/s links; flows: registry->n0, n0->n1, n0->n2, n1->n2. CPU-s per MB:
    # 0.01 at every child, 0.02 more at a node parent; 1.3 cores. By hand: n0's uplink and n2's
    # downlink freeze the three node-sent flows at 12.5 MB/s (1.125 cores); the registry's
    # flow then has (1.3 - 1.125) / 0.01 = 17.5 MB/s of CPU left, under its 25 MB/s link.
    m = Model(Params(nodes=3, host_cores=1.3, cpu_recv=0.01, cpu_send=0.02))
    parent, child = np.array([REGISTRY, 0, 0, 1]), np.array([0, 1, 2, 2])
    rate = m.max_min(parent, child, np.full(4, 4), np.zeros(4, dtype=bool))
    assert rate / 1e6 == pytest.approx([17.5, 12.5, 12.5, 12.5], rel=1e-9)
    unlimited = Model(Params(nodes=3)).max_min(parent, child, np.full(4, 4), np.zeros(4, bool))
    assert unlimited / 1e6 == pytest.approx([25.0, 12.5, 12.5, 12.5], rel=1e-9)


def test_a_rollout_on_shared_cores_takes_its_cpu_work_over_the_cores() -> None:
    links = run(nodes=16, fanout=2)
    recv, send, cores = 0.02, 0.01, 2.0
    cpu = run(nodes=16, fanout=2, host_cores=cores, cpu_recv=recv, cpu_send=send)
    # 16 receives, 15 of them sent by a node; the cores stay busy but for the ramps.
    work = (16 * recv + 15 * send) * 8 * MIB / 1e6 / cores
    assert cpu.time > links.time
    assert work <= cpu.time <= 1.05 * work
    # Cores that never bind change nothing.
    assert run(nodes=16, fanout=2, host_cores=1e6, cpu_recv=recv).time == links.time


def test_the_cpu_calibration_arithmetic() -> None:
    c = _herd_cpu.parse(
        "floor=2.5,floor_ctrd=4,alone=2.6,alone_shoal=0.5,star_shoal=20,star_sent=15"
    )
    assert c["nodes"] == 16 and c["cores"] == 2
    cost = _herd_cpu.costs(c, image_mb=50)
    assert cost.ctrd == pytest.approx(4 / (16 * 50))  # floor: 16 images into containerds
    assert cost.shoal_recv == pytest.approx(0.5 / 50)  # 1 node: one image through its shoal
    assert cost.send == pytest.approx((20 - 16 * 0.01 * 50) / (15 * 50))  # star: the rest
    assert cost.recv == pytest.approx(0.005 + 0.01)
    assert _herd_cpu.costs({**c, "star_shoal": 5.0}, image_mb=50).send == 0.0  # floored
    assert _herd_cpu.costs({**c, "nodes": 8, "cores": 4}, 50).ctrd == pytest.approx(4 / 400)
    with pytest.raises(ValueError, match="star_sent"):
        _herd_cpu.parse("floor=2.5,floor_ctrd=4,alone=2.6,alone_shoal=0.5,star_shoal=20")


def test_the_pair_phase_sets_the_sending_cost_when_given() -> None:
    base = "floor=2.5,floor_ctrd=4,alone=2.6,alone_shoal=0.5,star_shoal=20,star_sent=15"
    c = _herd_cpu.parse(base + ",pair_shoal=1.5,pair_sent=1")
    # Two shoals received an image each (0.01 CPU-s/MB), one also sent it to the other.
    assert _herd_cpu.costs(c, image_mb=50).send == pytest.approx((1.5 - 2 * 0.5) / 50)
    with pytest.raises(ValueError, match="pair_sent"):
        _herd_cpu.parse(base + ",pair_shoal=1.5")


def test_the_command_the_bench_prints_runs_the_model_against_its_times(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _herd_cpu.command(
        nodes=16, fanout=2, floor=(2.6, 3.8), alone=(2.6, 0.6), star=(20.0, 17.0, 15.0), tree=11.0,
        extra=("--mib", "8"),
    )  # fmt: skip
    assert herd_model.main(shlex.split(line)[1:]) == 0
    out = capsys.readouterr().out
    assert "shoal sending 0." in out
    assert "16 nodes, tree, fanout 2: model" in out and "measured 11.00 s" in out
    assert "16 nodes, star (today): model" in out and "measured 20.00 s" in out


def test_the_bench_fills_the_model_command_with_its_own_phases() -> None:
    def phase(took: float, shoal: float, ctrd: float, to_peers: dict[str, float]) -> herd.Phase:
        return herd.Phase("p", took, [took], 1.0, 1.0, {}, {}, to_peers, shoal, ctrd)

    run_ = {
        "floor": phase(2.72, 0.0, 4.16, {}),
        "one": phase(2.53, 0.44, 0.3, {"a": 0.0}),
        "star": phase(30.86, 27.73, 6.5, {"a": 11.5, "b": 2.0, "c": 1.5}),
        "tree": phase(8.35, 11.5, 4.6, {"a": 2.0}),
    }
    args = argparse.Namespace(nodes=16, fanout=2, mib=56, layers=4, rate="200mbit")
    assert shlex.split(herd.model_command(args, run_))[1:] == [
        "--nodes", "16", "--fanout", "0,2", "--calibrate-cpu",
        "floor=2.72,floor_ctrd=4.16,alone=2.53,alone_shoal=0.44,star_shoal=27.73,star_sent=15.00",
        "--measured-16", "2=8.35,0=30.86",
    ]  # fmt: skip
    run_["pair"] = phase(2.9, 1.31, 0.6, {"a": 1.0, "b": 0.01})
    assert "star_sent=15.00,pair_shoal=1.31,pair_sent=1.01" in herd.model_command(args, run_)


def test_work_not_tied_to_bytes_takes_the_cores_for_the_rollout() -> None:
    recv, cores = 0.02, 2.0
    plain = run(nodes=16, fanout=2, host_cores=cores, cpu_recv=recv)
    # 16 nodes each telling 15 peers 4 times, 5 ms each: 4.8 CPU-s on top of the bytes.
    kw = {"nodes": 16, "fanout": 2, "host_cores": cores, "cpu_recv": recv}
    busy = herd_model.solve(Params(mib=8, layers=4, announce_rounds=4, cpu_message=0.005, **kw))
    assert busy.params.messages == 16 * 15 * 4
    bytes_work = 16 * recv * 8 * MIB / 1e6
    assert busy.time == pytest.approx((bytes_work + 4.8) / cores, rel=0.1)
    assert busy.time > plain.time + 0.8 * 4.8 / cores
    # A steady 0.05 CPU-s per node per second leaves the flows 2 - 0.8 cores.
    steady = run(cpu_idle=0.05, **kw)
    assert steady.time == pytest.approx(bytes_work / (cores - 0.8), rel=0.1)
    # Past 20 nodes a record goes to the 20 closest only, so messages grow with N, not N^2.
    assert Params(nodes=1000, announce_rounds=4).messages == 4 * 1000 * 20
    # Without shared cores it changes nothing.
    free = {"nodes": 16, "fanout": 2, "announce_rounds": 4, "cpu_message": 0.005}
    assert herd_model.solve(Params(mib=8, layers=4, **free)).time == run(nodes=16, fanout=2).time


def test_the_pair_per_node_and_the_idle_cluster_calibrate_all_costs() -> None:
    base = "floor=2.5,floor_ctrd=4,alone=2.6,alone_shoal=0.9,star_shoal=20,star_sent=15"
    pair = ",pair_shoal=1.0,pair_sent=1,pair_relay=0.6,pair_recv=0.4,pair_ctrd=0.8"
    routing = ",idle=1.6,idle_routing=1.2,star=30,star_routing=13,star_msgs=960"
    cost = _herd_cpu.costs(_herd_cpu.parse(base + pair + routing), image_mb=50)
    assert cost.ctrd == pytest.approx(0.8 / 100)  # the pair's containerds, not the floor's
    assert cost.shoal_recv == pytest.approx(0.4 / 50)  # the receiving node, not the 1-node phase
    assert cost.send == pytest.approx((0.6 - 0.4) / 50)
    assert cost.idle == pytest.approx(0.1)  # per node per second
    assert cost.message == 0.0  # idle routing over the star's 30 s is more than it spent: floored
    cost = _herd_cpu.costs(
        _herd_cpu.parse(base + pair + routing.replace("star_routing=13", "star_routing=45")), 50
    )
    assert cost.message == pytest.approx((45 - 1.2 * 30) / 960)
    assert cost.rounds == pytest.approx(960 / (16 * 15))
    with pytest.raises(ValueError, match="star_msgs"):
        _herd_cpu.parse(base + routing.replace(",star_msgs=960", ""))


def test_the_bench_passes_the_pair_per_node_and_the_stars_routing_to_the_model() -> None:
    def phase(took: float, shoal: float, ctrd: float, to_peers: dict[str, float]) -> herd.Phase:
        return herd.Phase("p", took, [took], 1.0, 1.0, {}, {}, to_peers, shoal, ctrd)

    star = phase(30.0, 25.0, 6.0, {"a": 15.0})
    star.cpu_routing, star.dht, star.idle = 12.0, {"announce_streams": 900.0}, (1.5, 1.1)
    pair = phase(2.9, 1.0, 0.7, {"a": 0.01, "b": 1.0})
    pair.cpu_by_node = {"a": (0.45, 0.3), "b": (0.55, 0.4)}
    run_ = {"floor": phase(3.0, 0.0, 4.5, {}), "one": phase(2.6, 0.6, 0.4, {}), "star": star,
            "tree": phase(10.0, 13.0, 6.0, {}), "pair": pair}  # fmt: skip
    args = argparse.Namespace(nodes=16, fanout=2, mib=56, layers=4, rate="200mbit")
    line = herd.model_command(args, run_)
    assert "pair_relay=0.55,pair_recv=0.45,pair_ctrd=0.70" in line  # b sent the image
    assert "idle=1.500,idle_routing=1.100,star=30.00,star_routing=12.00,star_msgs=900" in line

"""The herd model (bench/herd_model.py) on small herds: the shapes the policy must give."""

from __future__ import annotations

import pytest
from bench.herd_model import Model, Params, Result


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

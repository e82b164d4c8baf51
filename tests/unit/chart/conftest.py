"""The chart, loaded once, and rendered once per value set, for every chart test."""

from __future__ import annotations

from collections.abc import Iterator

import helm_python as helm
import pytest

from tests.unit.chart.helpers import CHART_DIR, MANAGED_SETS, VALUE_SETS, render


@pytest.fixture(scope="package")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="package", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[str, list[dict]]:
    return request.param, render(chart, VALUE_SETS[request.param])


@pytest.fixture(scope="package", params=MANAGED_SETS)
def rendered_managed(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[str, list[dict]]:
    """The value sets in which the chart manages containerd's hosts directory."""
    return request.param, render(chart, VALUE_SETS[request.param])

"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.registries import Servers, open_servers


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    """Fake registries, a token server and a CDN on 127.0.0.1 (see tests/fakes/registries.py)."""
    async for s in open_servers():
        yield s

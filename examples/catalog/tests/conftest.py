"""Fixtures of the catalog example's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import FakeFetcher, Running, running


@pytest.fixture
def fetcher() -> FakeFetcher:
    return FakeFetcher()


@pytest.fixture
async def catalog(tmp_path: Path, fetcher: FakeFetcher) -> AsyncIterator[Running]:
    """callboard serving the catalog module over a fresh catalog file."""
    async with running(tmp_path / "catalog.db", fetcher) as served:
        yield served

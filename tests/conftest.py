"""Fixtures shared by every test tier."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from callboard.testing import RecordingEventsService


@pytest.fixture
async def events() -> AsyncIterator[RecordingEventsService]:
    """A started in-memory events service with instant retries, closed after the test."""
    service = RecordingEventsService()
    async with service:
        yield service

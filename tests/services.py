"""Real services the tests talk to: skipped on a laptop when down, a failure in CI."""

from __future__ import annotations

import os
import socket

import pytest

POSTGRES_URL = os.environ.get(
    "CALLBOARD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def service_up(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip the calling test when the service is down, or fail it when running in CI."""
    if service_up(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must start it (see .ci/run)")
    pytest.skip(message)

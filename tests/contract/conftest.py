"""The contract suite runs every test once per kit: callboard's own brokers, or the one named.

``pytest tests/contract`` runs it against memory, SQLite, PostgreSQL and the remote broker
(``-k sqlite`` and the like pick one). A broker from another package is tested with its own kit,
or through its URL::

    pytest tests/contract --broker-kit foo_broker.testing:contract_kit
    pytest tests/contract --broker-url 'foo://localhost/{unique}'

``--broker-kit`` names a function of the test's directory (a ``pathlib.Path``) returning a
``tests.contract.kit.BrokerKit``, or an awaitable of one. ``--broker-url`` builds the kit with
``BrokerKit.from_url`` (``{tmp_path}`` and ``{unique}`` give each test a store of its own).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from callboard.brokers.base import Broker
from tests.contract.kit import BrokerKit
from tests.contract.kits import KITS

#: The test id of a kit named on the command line.
CUSTOM = "custom"

_MARKS = {"postgresql": [pytest.mark.postgres]}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("callboard", "the broker contract suite (tests/contract)")
    group.addoption(
        "--broker-kit",
        metavar="MODULE:FUNCTION",
        help="run the broker contract suite against the kit this function of tmp_path returns",
    )
    group.addoption(
        "--broker-url",
        metavar="URL",
        help="run the broker contract suite against open_broker(URL); "
        "{tmp_path} and {unique} make a store per test",
    )


def _custom(config: pytest.Config) -> tuple[str | None, str | None]:
    kit: str | None = config.getoption("broker_kit", default=None)
    url: str | None = config.getoption("broker_url", default=None)
    if kit and url:
        raise pytest.UsageError("give --broker-kit or --broker-url, not both")
    return kit, url


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kit" not in metafunc.fixturenames:
        return
    if any(_custom(metafunc.config)):
        params = [pytest.param(CUSTOM)]
    else:
        params = [pytest.param(name, marks=_MARKS.get(name, [])) for name in KITS]
    metafunc.parametrize("kit", params, indirect=True)


async def _build(config: pytest.Config, name: str, tmp_path: Path) -> BrokerKit:
    if name != CUSTOM:
        return await KITS[name](tmp_path)
    spec, url = _custom(config)
    if url is not None:
        return BrokerKit.from_url(CUSTOM, url, tmp_path)
    assert spec is not None
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise pytest.UsageError(f"--broker-kit {spec!r}: expected MODULE:FUNCTION")
    made = getattr(importlib.import_module(module_name), attribute)(tmp_path)
    if inspect.isawaitable(made):
        made = await made
    if not isinstance(made, BrokerKit):
        raise pytest.UsageError(f"--broker-kit {spec!r} returned {made!r}, not a BrokerKit")
    return made


@pytest.fixture
async def kit(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BrokerKit]:
    made = await _build(request.config, request.param, tmp_path)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def broker(kit: BrokerKit) -> Broker:
    return await kit.open()

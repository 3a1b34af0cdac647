from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import callboard
import callboard.testing

API_DOC = Path(__file__).parents[2] / "docs" / "api.md"
_ENTRY = re.compile(r"^- `(?P<name>[^`]+)`: \S")


def documented() -> dict[str, set[str]]:
    """The names docs/api.md lists, by the module they are documented for."""
    names: dict[str, set[str]] = {"callboard": set(), "callboard.testing": set()}
    current = "callboard"
    for line in API_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            current = "callboard.testing" if "callboard.testing" in line else "callboard"
        elif line.startswith("- "):
            match = _ENTRY.match(line)
            assert match, f"docs/api.md: expected '- `Name`: description', got {line!r}"
            assert match["name"] not in names[current], f"{match['name']} is listed twice"
            names[current].add(match["name"])
    return names


def ruff_order(name: str) -> tuple[int, str]:
    """isort-style order, as ruff's RUF022 keeps it: CONSTANTS, then Classes, then the rest."""
    if name.isupper() and len(name) > 1:
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


PACKAGES = [callboard, callboard.testing]


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_all_is_sorted_and_has_no_repeats(package: ModuleType) -> None:
    names = list(package.__all__)
    assert names == sorted(names, key=ruff_order)
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_all_matches_the_docs_both_ways(package: ModuleType) -> None:
    listed = documented()[package.__name__]
    exported = set(package.__all__)
    assert exported - listed == set(), "exported but missing from docs/api.md"
    assert listed - exported == set(), "in docs/api.md but not exported"


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_exported_name_exists(package: ModuleType) -> None:
    for name in package.__all__:
        assert hasattr(package, name), name


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_public_class_and_function_is_exported(package: ModuleType) -> None:
    public = {
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
    }
    assert public - set(package.__all__) == set()


def test_the_version_is_a_string() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", callboard.__version__)


#: What the author of a broker, a body parser or a validator writes against.
AUTHORS_NEED = {
    "broker": [
        "Broker",
        "BrokerAdmin",
        "BrokerFactory",
        "Consumer",
        "Delivery",
        "Capabilities",
        "Start",
        "SubscriptionInfo",
        "RetentionPolicy",
        "DEAD_LETTER_PREFIX",
        "dead_letter_topic",
        "IN_PROCESS",
        "check_storable",
        "TopicMatcher",
        "Event",
        "DELIVERY_ID",
        "BrokerError",
        "BrokerUnavailable",
        "ConfigError",
        "InvalidEventError",
        "SubscriptionError",
    ],
    "parser": [
        "BodyParser",
        "MediaType",
        "MalformedBodyError",
        "UnsupportedMediaTypeError",
        "InvalidEventError",
    ],
    "validator": ["Validator", "WebhookRequest", "Rejection"],
}


@pytest.mark.parametrize("author", list(AUTHORS_NEED))
def test_what_an_author_writes_against_is_public(author: str) -> None:
    missing = set(AUTHORS_NEED[author]) - set(callboard.__all__)
    assert missing == set(), f"a {author} author needs these from callboard"


def test_the_broker_contract_is_exported_as_declared() -> None:
    import callboard.brokers.base as base

    for name in ("Broker", "BrokerAdmin", "BrokerFactory", "Consumer", "SubscriptionInfo"):
        assert getattr(callboard, name) is getattr(base, name)
    assert callboard.dead_letter_topic("g") == callboard.DEAD_LETTER_PREFIX + "g"


def test_the_api_page_points_broker_authors_to_their_guide() -> None:
    assert "docs/brokers.md" in API_DOC.read_text(encoding="utf-8")
    assert (API_DOC.parent / "brokers.md").is_file()

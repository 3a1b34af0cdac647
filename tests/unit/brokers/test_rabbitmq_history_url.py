"""The RabbitMQ broker's ``?history=`` URL option: parsed, checked, and kept from the driver."""

from __future__ import annotations

import pytest

from callboard.brokers.rabbitmq_names import history_name, making_name, parse_url
from callboard.errors import ConfigError

URL = "amqp://guest:guest@mq:5672/prod"


def test_history_is_off_unless_the_url_turns_it_on() -> None:
    assert parse_url(URL).history is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("false", False), ("False", False), ("0", False)],
)
def test_history_takes_true_or_false(value: str, expected: bool) -> None:
    assert parse_url(f"{URL}?history={value}").history is expected


def test_history_is_the_brokers_own_and_not_passed_to_the_driver() -> None:
    settings = parse_url(f"{URL}?prefix=cb.&history=true&x=1")
    assert (settings.prefix, settings.history) == ("cb.", True)
    assert settings.url == f"{URL}?x=1"


@pytest.mark.parametrize("value", ["yes", "", "on", "2", "true "])
def test_a_bad_history_value_is_a_config_error_naming_key_and_value(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_url(f"{URL}?history={value}")
    assert raised.value.path == "events.broker"
    message = str(raised.value)
    assert "?history=" in message
    assert repr(value) in message
    assert "true or false" in message


def test_the_stream_and_the_making_lock_are_named_within_the_prefix() -> None:
    assert history_name("cb.") == "cb.history"
    long_group = "g" * 300
    lock = making_name("cb.", long_group)
    assert lock.startswith("cb.making#")
    assert len(f"{lock}.lock".encode()) <= 255
    assert making_name("cb.", "a") != making_name("cb.", "b")

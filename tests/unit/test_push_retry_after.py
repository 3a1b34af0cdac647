"""Reading ``Retry-After``: seconds or an HTTP date."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from callboard.push.retry_after import retry_after

NOW = 1_700_000_000.0


def test_seconds() -> None:
    assert retry_after("120", NOW) == 120.0
    assert retry_after(" 0 ", NOW) == 0.0


def test_an_http_date_is_the_time_left_until_it() -> None:
    assert retry_after(formatdate(NOW + 90, usegmt=True), NOW) == pytest.approx(90.0)


def test_a_date_in_the_past_asks_for_no_wait() -> None:
    assert retry_after(formatdate(NOW - 90, usegmt=True), NOW) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5", "²", "Wed, 99 Foo 2015"])
def test_what_cannot_be_read_is_none(value: str | None) -> None:
    assert retry_after(value, NOW) is None

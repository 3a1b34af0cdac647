"""A push target's URL read without an HTTP client: its IP literal, its credentials hidden."""

from __future__ import annotations

import pytest

from callboard.push.urls import HIDDEN, host, ip_literal, redacted, without_credentials


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8080/hooks", "127.0.0.1"),
        ("https://[::1]/hooks", "::1"),
        ("http://[::ffff:169.254.169.254]:80/", "::ffff:169.254.169.254"),
        ("http://user:pw@10.0.0.1/x?y#z", "10.0.0.1"),
        ("http://localhost:8080/", None),
        ("https://hooks.example.com/in", None),
        ("http://127.1/", None),  # not an address as written: a name, resolved at connect time
    ],
)
def test_the_ip_literal_of_a_url(url: str, expected: str | None) -> None:
    assert ip_literal(url) == expected


def test_the_host_leaves_out_credentials_port_and_brackets() -> None:
    assert host("http://u:p@[fe80::1]:9/a") == "fe80::1"
    assert host("https://u:p@example.com:8443/a") == "example.com"
    assert host("https://example.com") == "example.com"


def test_credentials_are_hidden_in_every_form() -> None:
    url = "https://ops:s%40cret@hooks.example.com/in"
    text = f"bad {url!r}; decoded https://ops:s@cret@hooks.example.com/in"
    hidden = without_credentials(text, url)
    assert "s@cret" not in hidden
    assert "s%40cret" not in hidden
    assert hidden.count(f"{HIDDEN}@hooks.example.com") == 2


def test_a_url_without_credentials_leaves_the_text_alone() -> None:
    text = "Cannot connect to host hooks.example.com:443"
    assert without_credentials(text, "https://hooks.example.com/in") == text


def test_a_malformed_url_still_has_its_credentials_hidden() -> None:
    url = "http://user:pass@[::1:1/x"
    assert "pass" not in without_credentials(f"invalid URL {url}", url)


def test_redacted_keeps_everything_but_the_credentials() -> None:
    assert redacted("https://u:p@h.example/x?q=1") == f"https://{HIDDEN}@h.example/x?q=1"
    assert redacted("https://h.example/x") == "https://h.example/x"

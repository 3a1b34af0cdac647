"""The addresses a push target made over the API may not reach: every refused range, in IPv4
and IPv6, and IPv4 addresses written inside IPv6."""

from __future__ import annotations

import pytest

from callboard.push.addresses import ALLOW_KEY, refusal, refused_kind

REFUSED = [
    # IPv4
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("100.64.0.1", "private"),
    ("100.100.100.200", "private"),
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("169.254.169.254", "link-local"),
    ("169.254.0.1", "link-local"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.0.0.8", "reserved"),
    ("192.0.2.1", "reserved"),
    ("192.168.1.1", "private"),
    ("198.18.0.1", "reserved"),
    ("198.51.100.7", "reserved"),
    ("203.0.113.9", "reserved"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    # IPv6
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("::7f00:1", "reserved"),  # IPv4-compatible, deprecated
    ("64:ff9b:1::1", "private"),
    ("100::1", "reserved"),
    ("2001::1", "reserved"),
    ("2001:db8::1", "reserved"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("febf::1", "link-local"),
    ("fec0::1", "private"),
    ("ff02::1", "multicast"),
    # IPv4 inside IPv6: judged as the IPv4 address
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "link-local"),
    ("::ffff:10.1.2.3", "private"),
    ("::ffff:0.0.0.0", "unspecified"),
    ("64:ff9b::a9fe:a9fe", "link-local"),
    ("64:ff9b::192.168.0.1", "private"),
]

ALLOWED = [
    "1.1.1.1",
    "8.8.8.8",
    "9.255.255.255",
    "11.0.0.1",
    "100.63.255.255",
    "100.128.0.1",
    "126.255.255.255",
    "128.0.0.1",
    "169.253.0.1",
    "172.15.255.255",
    "172.32.0.1",
    "192.167.255.255",
    "192.169.0.1",
    "223.255.255.255",
    "2606:4700:4700::1111",
    "2a00:1450:4001::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
]


@pytest.mark.parametrize(("address", "kind"), REFUSED)
def test_a_refused_address_says_what_it_is(address: str, kind: str) -> None:
    assert refused_kind(address) == kind


@pytest.mark.parametrize("address", ALLOWED)
def test_a_public_address_may_be_reached(address: str) -> None:
    assert refused_kind(address) is None


@pytest.mark.parametrize("text", ["localhost", "example.com", "127.1", "2130706433", ""])
def test_a_name_is_not_judged_as_an_address(text: str) -> None:
    # Names are judged on the addresses they resolve to, when the request connects.
    assert refused_kind(text) is None


def test_the_refusal_names_the_address_and_the_key_that_allows_it() -> None:
    message = refusal("169.254.169.254", "link-local")
    assert "169.254.169.254 is a link-local address" in message
    assert f"{ALLOW_KEY}: true" in message
    assert ALLOW_KEY == "events.bus.pushPrivateNetworks"

"""Which network addresses a push target made over the API may not reach.

A runtime target's URL comes from a bus caller, not the operator: left free, it could make
callboard POST to the cloud's metadata service (169.254.169.254), an admin port on loopback or
any host of the private network behind the server (server-side request forgery). Those
addresses are refused unless ``events.bus.pushPrivateNetworks`` allows them. Sans-I/O: the
sender applies the rule to each address it is about to connect to, after DNS resolution, so a
name that resolves to a public address when checked and a private one when used (DNS
rebinding) gains nothing.

The ranges are written out, not read from ``ipaddress``'s ``is_private`` and its kin, whose
meaning has changed between Python versions; an IPv4 address inside IPv6 (IPv4-mapped
``::ffff:0:0/96``, NAT64 ``64:ff9b::/96``) is judged as the IPv4 address it stands for.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

#: The configuration key that lets runtime targets reach these addresses.
ALLOW_KEY = "events.bus.pushPrivateNetworks"

_IPV4: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(network), kind)
    for network, kind in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "private"),  # shared address space (RFC 6598): carrier-grade NAT
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),  # cloud metadata services live here
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "reserved"),  # documentation
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),  # benchmarking
        ("198.51.100.0/24", "reserved"),  # documentation
        ("203.0.113.0/24", "reserved"),  # documentation
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # the limited broadcast address included
    )
)
_IPV6: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(network), kind)
    for network, kind in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "private"),  # NAT64 for local use (RFC 8215)
        ("::/8", "reserved"),  # IPv4-compatible addresses, deprecated, among them
        ("100::/64", "reserved"),  # discard-only
        ("2001::/23", "reserved"),  # IETF protocol assignments, Teredo included
        ("2001:db8::/32", "reserved"),  # documentation
        ("fc00::/7", "private"),  # unique local addresses
        ("fe80::/10", "link-local"),
        ("fec0::/10", "private"),  # site-local, deprecated
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = IPv6Network("64:ff9b::/96")


def refused_kind(address: str) -> str | None:
    """Why ``address`` (an IP address as text, a zone ``%eth0`` allowed) may not be reached
    by a runtime target: ``loopback``, ``private``, ``link-local``, ``unspecified``,
    ``multicast`` or ``reserved``; ``None`` when it may be, or is not an IP address."""
    try:
        ip = ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, IPv6Address):
        inner = ip.ipv4_mapped
        if inner is None and ip in _NAT64:
            inner = IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is None:
            bare = IPv6Address(int(ip))  # without its zone
            return next((kind for network, kind in _IPV6 if bare in network), None)
        ip = inner
    return next((kind for network, kind in _IPV4 if ip in network), None)


def refusal(address: str, kind: str) -> str:
    """The message of a refused address: what it is, and the key that allows it."""
    return (
        f"{address} is a {kind} address, which push targets made over the API may not reach "
        f"(loopback, private, link-local and reserved networks are refused); set {ALLOW_KEY}: "
        "true to allow them"
    )

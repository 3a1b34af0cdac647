"""Two readings of a push target's URL that need no HTTP client: its host when that is an IP
address, and a text with the URL's credentials (``user:password@``) taken out.

A URL may carry credentials in its userinfo, and the HTTP client repeats the whole URL in some
of its errors (an invalid URL, for one): every failure message built from such an error goes
through ``without_credentials`` before it is raised or logged. The URL is split by hand, not by
``urllib.parse``, which raises on some malformed URLs, the very ones whose errors repeat them.
"""

from __future__ import annotations

from ipaddress import ip_address
from urllib.parse import unquote

#: What stands for a URL's credentials in a message.
HIDDEN = "***"


def _authority(url: str) -> str:
    """The part of ``url`` between ``scheme://`` and the path, query or fragment."""
    rest = url.partition("://")[2]
    for end in "/?#":
        rest = rest.partition(end)[0]
    return rest


def _userinfo(url: str) -> str:
    return _authority(url).rpartition("@")[0]


def host(url: str) -> str:
    """The host of ``url`` as written, without credentials, port or IPv6 brackets."""
    authority = _authority(url).rpartition("@")[2]
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    return authority.rpartition(":")[0] if ":" in authority else authority


def ip_literal(url: str) -> str | None:
    """The host of ``url`` when it is an IP address (``127.0.0.1``, ``[::1]``), else ``None``."""
    name = host(url)
    try:
        ip_address(name)
    except ValueError:
        return None
    return name


def without_credentials(text: str, url: str) -> str:
    """``text`` with ``url``'s userinfo hidden wherever it is written before an ``@``, as the
    URL spells it or percent-decoded (as the HTTP client may repeat it)."""
    userinfo = _userinfo(url)
    if not userinfo:
        return text
    for form in sorted({userinfo, unquote(userinfo)}, key=len, reverse=True):
        text = text.replace(f"{form}@", f"{HIDDEN}@")
    return text


def redacted(url: str) -> str:
    """``url`` with its userinfo hidden: fit for an API answer or a log line."""
    return without_credentials(url, url)

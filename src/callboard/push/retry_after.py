"""Reading ``Retry-After`` (RFC 9110, section 10.2.3): a number of seconds, or an HTTP date."""

from __future__ import annotations

from email.utils import parsedate_to_datetime


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from ``now`` (Unix time) that ``value`` asks for; ``None`` when it is
    absent or unreadable. A date in the past asks for no wait (0)."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT; a date without a zone is not one
        return None
    return max(0.0, when.timestamp() - now)

"""A token bucket: a push target's rate limit.

Sans-I/O: ``reserve`` answers how long the caller must wait before it may send, and takes the
token at once (the count may go below zero), so callers arriving together are spaced out in the
order they asked instead of all waking at the next refill.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` kept; one token per request."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def reserve(self) -> float:
        """Take a token; the seconds to wait before using it (0: go now)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

"""A circuit breaker: stop pushing to an endpoint that keeps failing, try it again later.

Closed, every request goes. After ``failures`` failures in a row it opens: for ``cooldown``
seconds no request goes, and each delivery fails at once asking to be retried when the
cool-down ends. Then it is half-open: one request goes as a trial; its success closes the
breaker, its failure opens it again for another cool-down. While the trial is out, the other
deliveries wait a little and ask again.

Sans-I/O, with an injectable clock; ``on_change`` hears each change of state once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from time import monotonic


class State(enum.Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Counts consecutive failures of one endpoint and decides whether a request may go."""

    def __init__(
        self,
        failures: int,
        cooldown: float,
        *,
        on_change: Callable[[State, State], None] | None = None,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        if failures < 1 or cooldown <= 0:
            raise ValueError("a circuit breaker needs failures >= 1 and a positive cool-down")
        self.threshold = failures
        self.cooldown = cooldown
        self.state = State.CLOSED
        self._on_change = on_change
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._trial = False

    def admit(self) -> float | None:
        """``None`` when a request may go now; else the seconds to wait before asking again.

        When the breaker is half-open, the request admitted is its trial: report its outcome
        with ``succeeded`` or ``failed``.
        """
        state = self.state
        if state is State.CLOSED:
            return None
        if state is State.OPEN:
            left = self._opened_at + self.cooldown - self._clock()
            if left > 0:
                return left
            self._change(State.HALF_OPEN)
        if self._trial:
            return min(1.0, self.cooldown)
        self._trial = True
        return None

    def succeeded(self) -> None:
        self._failures = 0
        self._trial = False
        if self.state is not State.CLOSED:
            self._change(State.CLOSED)

    def failed(self) -> None:
        self._trial = False
        self._failures += 1
        if self.state is State.HALF_OPEN or (
            self.state is State.CLOSED and self._failures >= self.threshold
        ):
            self._opened_at = self._clock()
            self._change(State.OPEN)

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def _change(self, state: State) -> None:
        before, self.state = self.state, state
        if self._on_change is not None:
            self._on_change(before, state)

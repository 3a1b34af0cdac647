"""What the ingress page shows: per topic, the answers of the last hour, and the last refusals.

``IngressStats`` is an ``IngressObserver``: the ingress tells it of every request once answered.
It keeps one bucket per topic and minute (statuses counted) for an hour, and a ring of the last
refusals. An outcome holds no header but the delivery id and no body, so neither a secret nor a
signature is ever kept here.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from callboard.ingress.types import IngressOutcome

MINUTES = 60
REFUSALS = 50


@dataclass(frozen=True, slots=True)
class TopicCounts:
    """One topic's answers over the window: accepted, and refused by status."""

    topic: str
    accepted: int
    refused: dict[int, int]

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())


class IngressStats:
    """Per-minute counts per topic for ``minutes``, and the last ``refusals`` refusals."""

    def __init__(
        self,
        *,
        minutes: int = MINUTES,
        refusals: int = REFUSALS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.minutes = minutes
        self._clock = clock
        #: topic -> (minute, statuses counted) oldest first.
        self._buckets: dict[str, deque[tuple[int, Counter[int]]]] = {}
        self._refusals: deque[IngressOutcome] = deque(maxlen=refusals)

    def request(self, outcome: IngressOutcome) -> None:
        minute = int(outcome.at // 60)
        buckets = self._buckets.get(outcome.topic)
        if buckets is None:
            buckets = self._buckets[outcome.topic] = deque()
        if not buckets or buckets[-1][0] != minute:
            buckets.append((minute, Counter()))
            self._prune(buckets, minute)
        buckets[-1][1][outcome.status] += 1
        if outcome.status >= 300:
            self._refusals.append(outcome)

    def _prune(self, buckets: deque[tuple[int, Counter[int]]], minute: int) -> None:
        while buckets and buckets[0][0] <= minute - self.minutes:
            buckets.popleft()

    def topics(self) -> list[TopicCounts]:
        """Each topic seen in the window, by name."""
        minute = int(self._clock() // 60)
        counts = []
        for topic in sorted(self._buckets):
            buckets = self._buckets[topic]
            self._prune(buckets, minute)
            total: Counter[int] = Counter()
            for _, statuses in buckets:
                total.update(statuses)
            if not total:
                continue
            accepted = sum(n for status, n in total.items() if status < 300)
            refused = {status: n for status, n in sorted(total.items()) if status >= 300}
            counts.append(TopicCounts(topic, accepted, refused))
        return counts

    def refusals(self) -> list[IngressOutcome]:
        """The last refusals, the newest first."""
        return list(reversed(self._refusals))

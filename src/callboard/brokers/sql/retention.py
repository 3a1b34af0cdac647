"""What a retention pass deletes, and whom it costs: shared by the SQL dialects.

A pass finds its range once (``RetentionRange``), without reading the events it keeps: the
newest events older than the maximum and the minimum age, each one step down the ``stored_at``
index, and the count edge, one ``OFFSET`` from the newest end. It then deletes the range in
batches, each a window of ``batch_size`` events of the primary key after the previous one: a
batch reads at most twice its size, wherever it is in the table. ``stored_at`` grows with
``seq`` only nearly (processes' clocks differ a little, and a transaction may commit after a
later one), so the range is a bound, not the verdict: each batch checks every event's age again,
and an event younger than the policy allows is never deleted, whatever its ``seq``; an old event
just beyond the range goes in a later pass.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

#: A deleted event as a batch returns it: ``(seq, topic, target)``.
Doomed = tuple[int, str, str | None]


@dataclass(frozen=True, slots=True)
class RetentionRange:
    """Where one retention pass deletes, found once at its start."""

    #: Events up to this seq older than ``min_age`` are deleted (0: none): the count edge
    #: (beyond it the newest ``max_count`` are kept), or the newest event older than
    #: ``min_age`` if that comes first.
    edge: int
    #: The newest seq the pass may delete: the edge, or the newest event older than
    #: ``max_age`` if that is further.
    upto: int

    @classmethod
    def bound(cls, old: int, young: int, count: int) -> RetentionRange | None:
        """The range from the newest events older than ``max_age`` (``old``) and ``min_age``
        (``young``) and the count edge (``count``), 0 for each one missing; ``None``: empty."""
        edge = min(young, count)
        upto = max(edge, old)
        return cls(edge=edge, upto=upto) if upto else None


def unreceived(
    rows: Sequence[Doomed], groups: Iterable[tuple[str, Callable[[str], bool], int]]
) -> Counter[str]:
    """Per group ``(name, matcher, position)``, how many deleted ``rows`` it had not received.

    A group received every event up to its position; beyond it, the events of its topics and
    those delivered to it alone were still to come. ``rows`` are in seq order. The cost follows
    the rows beyond each group's position (nothing for a group that keeps up), each distinct
    topic matched once per group.
    """
    seqs = [seq for seq, _, _ in rows]
    lost: Counter[str] = Counter()
    for name, matcher, position in groups:
        start = bisect_right(seqs, position)
        if start == len(rows):
            continue
        matched: dict[str, bool] = {}
        count = 0
        for _, topic, target in rows[start:]:
            if target is not None:
                count += target == name
                continue
            hit = matched.get(topic)
            if hit is None:
                hit = matched[topic] = matcher(topic)
            count += hit
        if count:
            lost[name] += count
    return lost

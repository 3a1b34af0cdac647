"""The SQL brokers' retention range and lost accounting, without a database."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from callboard.brokers.sql.retention import RetentionRange, unreceived
from callboard.topics import TopicMatcher


@pytest.mark.parametrize(
    ("old", "young", "count", "expected"),
    [
        (0, 0, 0, None),  # nothing outside the window
        (0, 500, 300, RetentionRange(edge=300, upto=300)),  # the count keeps the newest
        (0, 200, 300, RetentionRange(edge=200, upto=200)),  # min_age keeps what the count would not
        (400, 200, 300, RetentionRange(edge=200, upto=400)),  # max_age goes further
        (100, 200, 300, RetentionRange(edge=200, upto=200)),
        (400, 0, 0, RetentionRange(edge=0, upto=400)),  # by age alone
    ],
)
def test_a_pass_covers_the_edge_and_whatever_is_older_than_max_age(
    old: int, young: int, count: int, expected: RetentionRange | None
) -> None:
    assert RetentionRange.bound(old, young, count) == expected


def _group(name: str, patterns: list[str], position: int) -> tuple[str, Callable[[str], bool], int]:
    return name, TopicMatcher(patterns), position


def test_a_group_lost_what_came_after_its_position_for_it() -> None:
    rows = [
        (1, "a", None),
        (2, "b", None),
        (3, "a", "late"),  # delivered to `late` alone
        (4, "a", None),
        (5, "b", None),
        (6, "b", "other"),
    ]
    lost = unreceived(
        rows,
        [
            _group("late", ["a"], 0),  # 1, 3 (its own), 4
            _group("all", ["a", "b"], 2),  # 4, 5 (not 3 or 6: another group's)
            _group("caught-up", ["a", "b"], 6),
            _group("none", ["c.>"], 0),
            _group("other", ["x"], 5),  # 6, its own
        ],
    )
    assert lost == {"late": 3, "all": 2, "other": 1}


def test_each_topic_is_matched_once_per_group() -> None:
    calls: list[str] = []

    def matcher(topic: str) -> bool:
        calls.append(topic)
        return topic == "a"

    rows = [(seq, "ab"[seq % 2], None) for seq in range(1, 1001)]
    assert unreceived(rows, [("g", matcher, 500)]) == {"g": 250}
    assert sorted(calls) == ["a", "b"]

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from callboard.gc_tuning import YOUNG_THRESHOLD, tune_for_serving


@pytest.fixture
def collector() -> Iterator[None]:
    """Put the interpreter's collector back as it was."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector")
def test_freezes_what_is_alive_and_collects_young_objects_less_often() -> None:
    gc.set_threshold(700, 10, 10)
    built_at_start = [{"key": n} for n in range(100)]

    tune_for_serving()

    assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
    assert gc.get_freeze_count() >= len(built_at_start)
    # Frozen: no generation that a pass traverses holds them any more.
    traversed = {id(o) for o in gc.get_objects()}
    assert not traversed & {id(d) for d in built_at_start}


@pytest.mark.usefixtures("collector")
def test_keeps_a_higher_threshold_set_by_the_operator() -> None:
    gc.set_threshold(50_000, 20, 5)
    tune_for_serving()
    assert gc.get_threshold() == (50_000, 20, 5)


@pytest.mark.usefixtures("collector")
def test_cycles_are_still_collected() -> None:
    tune_for_serving()

    class Node:
        other: Node | None = None

    first, second = Node(), Node()
    first.other, second.other = second, first
    del first, second
    assert gc.collect() >= 2

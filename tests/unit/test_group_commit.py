"""The group-commit engine of the SQL brokers, with a stand-in flush (no database needed)."""

from __future__ import annotations

import asyncio

import pytest

from callboard.errors import BrokerUnavailable
from callboard.group_commit import GroupCommit


class Store:
    """A flush that takes ``delay`` seconds and records the size of every batch."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.batches: list[int] = []

    async def flush(self, items: list[int]) -> list[int]:
        self.batches.append(len(items))
        await asyncio.sleep(self.delay)
        return [item * 10 for item in items]


async def callers(commit: GroupCommit[int, int], count: int, rounds: int) -> None:
    """Callers that come back, each after its own short pause, with their next item."""

    async def caller(n: int) -> None:
        for _ in range(rounds):
            assert await commit.submit(n) == n * 10
            await asyncio.sleep(0.0005 * n)

    await asyncio.gather(*(caller(n) for n in range(count)))


async def test_callers_coming_back_share_the_next_commit() -> None:
    store = Store()
    await callers(GroupCommit(store.flush, 100, regroup=0.2), count=8, rounds=4)
    # The next commit waits for three quarters of them, not only for the first one back.
    assert store.batches[0] == 8
    assert store.batches[1] >= 6, store.batches


async def test_without_regrouping_callers_split_into_commits_of_their_own() -> None:
    store = Store()
    await callers(GroupCommit(store.flush, 100), count=8, rounds=4)
    assert store.batches[0] == 8
    assert store.batches[1] < 6, store.batches


async def test_a_light_load_is_not_held_back() -> None:
    store = Store(delay=0)
    commit: GroupCommit[int, int] = GroupCommit(store.flush, 100, regroup=5.0)
    async with asyncio.timeout(1):
        for n in range(3):
            assert await asyncio.gather(commit.submit(n), commit.submit(n)) == [n * 10] * 2
    await commit.wait_idle()


async def test_an_outage_fails_everything_queued() -> None:
    async def down(items: list[int]) -> list[int]:
        await asyncio.sleep(0.01)
        raise BrokerUnavailable("down")

    commit: GroupCommit[int, int] = GroupCommit(down, 100, regroup=0.05)
    first = asyncio.ensure_future(commit.submit(1))
    await asyncio.sleep(0)
    later = asyncio.ensure_future(commit.submit(2))
    for outcome in (first, later):
        with pytest.raises(BrokerUnavailable):
            await outcome
    await commit.wait_idle()


async def test_a_caller_giving_up_cancels_nobody_else() -> None:
    store = Store()
    commit: GroupCommit[int, int] = GroupCommit(store.flush, 100)
    impatient = asyncio.ensure_future(commit.submit(1))
    patient = asyncio.ensure_future(commit.submit(2))
    await asyncio.sleep(0.005)  # both are in the flush
    impatient.cancel()
    assert await patient == 20
    assert impatient.cancelled()
    assert store.batches == [2]
    await commit.wait_idle()


async def test_items_submitted_together_get_their_results_in_order_across_commits() -> None:
    store = Store(delay=0.001)
    commit: GroupCommit[int, int] = GroupCommit(store.flush, 4)
    lone = asyncio.ensure_future(commit.submit(100))
    assert await commit.submit_many(list(range(10))) == [n * 10 for n in range(10)]
    assert await lone == 1000
    assert store.batches == [4, 4, 3]
    assert await commit.submit_many([]) == []
    await commit.wait_idle()


async def test_items_submitted_together_fail_together() -> None:
    async def refuse(items: list[int]) -> list[int]:
        raise BrokerUnavailable("down")

    commit: GroupCommit[int, int] = GroupCommit(refuse, 2)
    with pytest.raises(BrokerUnavailable):
        await commit.submit_many([1, 2, 3])
    await commit.wait_idle()


async def test_giving_up_on_items_submitted_together_cancels_nobody_else() -> None:
    store = Store()
    commit: GroupCommit[int, int] = GroupCommit(store.flush, 100)
    impatient = asyncio.ensure_future(commit.submit_many([1, 2]))
    patient = asyncio.ensure_future(commit.submit(3))
    await asyncio.sleep(0.005)
    impatient.cancel()
    assert await patient == 30
    assert impatient.cancelled()
    assert store.batches == [3]
    await commit.wait_idle()


async def test_settled_hears_of_each_commit_after_its_callers_came_back() -> None:
    store = Store()
    heard: list[tuple[list[int], int]] = []
    commit: GroupCommit[int, int] = GroupCommit(
        store.flush, 100, regroup=0.2, settled=lambda items: heard.append((items, len(queued)))
    )
    queued = commit._queue  # what waits for the next commit when the hook runs
    await callers(commit, count=8, rounds=2)
    await commit.wait_idle()
    assert sorted(heard[0][0]) == list(range(8))
    # Three quarters of the first commit's callers were back, queued, before the hook ran.
    assert heard[0][1] >= 6
    assert sum(len(items) for items, _ in heard) == 16


async def test_settled_does_not_hear_of_a_failed_commit() -> None:
    async def refuse(items: list[int]) -> list[int]:
        raise BrokerUnavailable("down")

    heard: list[list[int]] = []
    commit: GroupCommit[int, int] = GroupCommit(refuse, 10, settled=heard.append)
    with pytest.raises(BrokerUnavailable):
        await commit.submit(1)
    await commit.wait_idle()
    assert heard == []

"""Retention on the NATS broker's events stream: ``clean``.

``min_age`` and ``max_count`` together need a look at the messages' times, which stream limits
cannot take, so ``clean`` finds the first sequence to keep (bisecting the stored times) and
purges below it; the stream's own ``max_age``, one cleanup interval later, is a backstop when
no broker runs. What each group lost is the drop of its consumers' pending count across the
purge, added to its record.
"""

from __future__ import annotations

import logging
import time

import nats.js.errors

from callboard.brokers.nats_admin import TRANSIENT, NatsAdmin, unavailable

logger = logging.getLogger(__name__)


class NatsRetention(NatsAdmin):
    """``clean`` over the operations."""

    async def clean(self) -> int:
        """Delete what the retention policy no longer keeps; count what each group lost."""
        policy, stream = self._retention, self._layout.events
        try:
            state = (await self._jsc.stream_info(stream)).state
            if not state.messages:
                return 0
            first, last = state.first_seq, state.last_seq
            now = time.time()
            young = await self._first_since(now - policy.min_age, first, last)
            recent = await self._first_since(now - policy.max_age, first, last)
            cutoff = max(min(last - policy.max_count + 1, young), recent)
            if cutoff <= first:
                return 0
            groups = {key: record["name"] for key, record in await self._records()}
            before = {key: await self._positions(key) for key in groups}
            deleted = 0
            step = first
            while step < cutoff:
                step = min(cutoff, step + policy.batch_size)
                deleted += await self._purge(stream, seq=step)
            for key, name in groups.items():
                await self._count_lost(key, name, before[key], cutoff)
        except TRANSIENT as error:
            raise unavailable("applying retention", error) from error
        if deleted:
            logger.info("NATS retention: deleted %d events from %s", deleted, stream)
        return deleted

    async def _first_since(self, moment: float, first: int, last: int) -> int:
        """The first sequence stored at or after ``moment`` (``last + 1``: none), by bisection."""
        low, high = first, last + 1
        while low < high:
            middle = (low + high) // 2
            try:
                found = await self._jsc.get_msg(self._layout.events, middle, next=True)
            except nats.js.errors.NotFoundError:
                high = middle
                continue
            assert found.seq is not None
            assert found.time is not None
            if found.time.timestamp() >= moment:
                high = middle
            else:
                low = found.seq + 1
        return low

    async def _count_lost(
        self, key: str, name: str, before: dict[str, tuple[int, int]], cutoff: int
    ) -> None:
        """Add to the group's record what the purge below ``cutoff`` took before it received it.

        A consumer whose position had reached the cut lost nothing (so a group keeping up never
        counts what it fetched meanwhile); one behind it lost the drop of its pending count.
        """
        after = await self._positions(key)
        lost = 0
        for consumer, (pending, position) in before.items():
            if position < cutoff - 1 and consumer in after:
                lost += max(0, pending - after[consumer][0])
        if lost > 0:
            await self._add_lost(key, lost)
            logger.warning(
                "subscription %r fell behind the retained window: retention deleted %d events "
                "it had not received",
                name,
                lost,
            )

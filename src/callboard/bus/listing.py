"""What the broker records about its subscriptions, read through one small adapter.

``Broker.subscriptions()`` lists every consumer group with its topics; a broker that cannot
list them answers ``None`` here, and the bus then knows only the subscriptions made on this
server.
"""

from __future__ import annotations

from typing import Any

from callboard.brokers.base import Broker


async def stored_subscriptions(broker: Broker) -> dict[str, tuple[str, ...]] | None:
    """Subscription id -> topic patterns, as the broker keeps them, or ``None``."""
    infos = await subscription_infos(broker)
    if infos is None:
        return None
    return {info.name: tuple(info.topics) for info in infos}


async def subscription_infos(broker: Broker) -> list[Any] | None:
    """The broker's ``SubscriptionInfo`` list, or ``None`` when it keeps no such list."""
    lister = getattr(broker, "subscriptions", None)
    if lister is None:
        return None
    return list(await lister())

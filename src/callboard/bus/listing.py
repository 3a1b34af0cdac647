"""What the broker records about its subscriptions, read through one small adapter.

``BrokerAdmin.subscriptions()`` lists every consumer group with its topics; a broker that offers
no operations (``None`` here) cannot list them, and the bus then knows only the subscriptions
made on this server.
"""

from __future__ import annotations

from callboard.brokers.base import BrokerAdmin, SubscriptionInfo


async def stored_subscriptions(admin: BrokerAdmin | None) -> dict[str, tuple[str, ...]] | None:
    """Subscription id -> topic patterns, as the broker keeps them, or ``None``."""
    infos = await subscription_infos(admin)
    if infos is None:
        return None
    return {info.name: tuple(info.topics) for info in infos}


async def subscription_infos(admin: BrokerAdmin | None) -> list[SubscriptionInfo] | None:
    """The broker's ``SubscriptionInfo`` list, or ``None`` when it offers no operations."""
    if admin is None:
        return None
    return list(await admin.subscriptions())

"""The event-based entity provider: a callboard subscriber that keeps the catalog up to date."""

from __future__ import annotations

import logging

from callboard import Event
from catalog_provider.changes import TOPICS, change_of
from catalog_provider.descriptor import parse_descriptor
from catalog_provider.fetchers import Fetcher
from catalog_provider.store import CatalogStore

logger = logging.getLogger("catalog.provider")

DESCRIPTOR_PATH = "catalog-info.yaml"


class CatalogProvider:
    """Subscribes to repository and push events and writes what they change to the catalog.

    Handling an event twice leaves the catalog as handling it once (callboard delivers at least
    once): each write is an upsert guarded by the event's time. A descriptor that cannot be read
    raises, and callboard retries the event; one that can be read but is wrong is kept as the
    repository's errors, in place of its entities.
    """

    subscriber_id = "catalog"
    topics = TOPICS

    def __init__(
        self, store: CatalogStore, fetcher: Fetcher, *, path: str = DESCRIPTOR_PATH
    ) -> None:
        self.store = store
        self.fetcher = fetcher
        self.path = path

    async def on_event(self, event: Event) -> None:
        change = change_of(event, self.path)
        if change is None:
            return
        repository = change.repository
        if change.deleted:
            self.store.record(repository, event.time, deleted=True)
            return
        self.store.record(repository, event.time)
        if not change.refresh or not self.store.wants_refresh(repository.key, event.time):
            return
        text = await self.fetcher.fetch(repository, self.path, change.ref)
        descriptor = parse_descriptor(text)
        if descriptor.errors:
            logger.warning("%s of %s: %s", self.path, repository.slug, "; ".join(descriptor.errors))
        self.store.set_entities(repository.key, descriptor, change.ref, event.time)

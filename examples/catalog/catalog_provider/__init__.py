"""An event-based entity provider: a catalog of repositories kept up to date from webhooks."""

from catalog_provider.changes import Change, Repository, change_of
from catalog_provider.descriptor import Descriptor, parse_descriptor
from catalog_provider.fetchers import Fetcher, FetchError, HttpFetcher
from catalog_provider.module import CatalogModule, module
from catalog_provider.provider import CatalogProvider
from catalog_provider.store import CatalogRecord, CatalogStore

__all__ = [
    "CatalogModule",
    "CatalogProvider",
    "CatalogRecord",
    "CatalogStore",
    "Change",
    "Descriptor",
    "FetchError",
    "Fetcher",
    "HttpFetcher",
    "Repository",
    "change_of",
    "module",
    "parse_descriptor",
]

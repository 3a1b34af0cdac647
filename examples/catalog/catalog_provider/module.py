"""The callboard module: ``events.load: ["catalog_provider.module:module"]``.

Configuration, ``events.modules.catalog`` (every key optional)::

    database: catalog.db           # the catalog's SQLite file
    path: catalog-info.yaml        # the descriptor file in each repository
    github:
      apiUrl: https://api.github.com
      token: ${GITHUB_TOKEN}       # for private repositories and a higher rate limit
    gitlab:
      url: https://gitlab.example.com   # default: the instance the event names
      token: ${GITLAB_TOKEN}

The module subscribes when the application starts and stops its subscription before it closes
the catalog, so no event is handled against a closed store.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from callboard import EventsService, ModuleContext, Subscription
from catalog_provider.fetchers import Fetcher, GithubAccess, GitlabAccess, HttpFetcher
from catalog_provider.provider import DESCRIPTOR_PATH, CatalogProvider
from catalog_provider.store import CatalogStore


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class GithubSettings(_Section):
    api_url: str = Field(default="https://api.github.com", alias="apiUrl")
    token: str | None = None


class GitlabSettings(_Section):
    url: str | None = None
    token: str | None = None


class CatalogSettings(_Section):
    database: str = "catalog.db"
    path: str = Field(default=DESCRIPTOR_PATH, min_length=1)
    github: GithubSettings = GithubSettings()
    gitlab: GitlabSettings = GitlabSettings()


class CatalogModule:
    """Keeps a catalog of repositories from GitHub and GitLab events.

    ``fetcher`` replaces the HTTP fetcher the configuration describes (tests pass a fake).
    """

    def __init__(self, *, fetcher: Fetcher | None = None, name: str = "catalog") -> None:
        self.name = name
        self.fetcher = fetcher

    def register(self, context: ModuleContext) -> None:
        settings = context.settings(CatalogSettings)
        fetcher = self.fetcher or HttpFetcher(
            GithubAccess(settings.github.api_url, settings.github.token),
            GitlabAccess(settings.gitlab.url, settings.gitlab.token),
        )
        store = CatalogStore(settings.database)
        provider = CatalogProvider(store, fetcher, path=settings.path)
        running: list[Subscription] = []

        async def start(events: EventsService) -> None:
            store.open()
            running.append(await events.add_subscriber(provider))

        async def stop() -> None:
            while running:
                await running.pop().close()
            store.close()

        context.lifecycle.on_start(start)
        context.lifecycle.on_stop(stop)


module = CatalogModule()

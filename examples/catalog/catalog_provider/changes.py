"""What a GitHub or GitLab event means for the catalog, read from its payload.

Each function takes one event as callboard routes it and returns a ``Change`` (or ``None`` when
the event says nothing about the catalog). The payload shapes are the providers' own:

- GitHub ``repository`` events (``github.repository``): ``action`` is ``created``, ``renamed``,
  ``transferred``, ``edited``, ``archived``, ``unarchived``, ``deleted``, ...; ``repository``
  always holds the repository as it is after the change, so every action but ``deleted`` is the
  same upsert (https://docs.github.com/en/webhooks/webhook-events-and-payloads#repository).
- GitHub ``push`` (``github.push``): ``ref``, ``head_commit`` (``null`` when the branch was
  deleted), ``commits[].added/modified/removed`` and ``repository``.
- GitLab system hooks (``gitlab.project_create``, ``project_rename``, ``project_transfer``,
  ``project_update``, ``project_destroy``): ``project_id`` and ``path_with_namespace``; the
  instance's address is in the ``X-Gitlab-Instance`` header. GitLab sends ``project_update``
  when a project is archived but does not say so, so GitLab projects are never marked archived
  (https://docs.gitlab.com/administration/system_hooks/).
- GitLab ``push`` (``gitlab.push``, a project, group or system hook): ``ref``, ``checkout_sha``
  (``null`` when the branch was deleted), ``project``, ``commits`` (at most 20 of
  ``total_commits_count``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from callboard import Event

logger = logging.getLogger("catalog.changes")

#: The topics the catalog reads, as callboard's GitHub and GitLab modules route them.
GITHUB_TOPICS = ("github.repository", "github.push")
GITLAB_PROJECT_EVENTS = (
    "project_create",
    "project_rename",
    "project_transfer",
    "project_update",
    "project_destroy",
)
GITLAB_TOPICS = ("gitlab.push", *(f"gitlab.{name}" for name in GITLAB_PROJECT_EVENTS))
TOPICS = GITHUB_TOPICS + GITLAB_TOPICS

#: GitHub lists at most this many commits in a push; a longer push may touch any file.
GITHUB_MAX_COMMITS = 2048


@dataclass(frozen=True, slots=True)
class Repository:
    """A repository as an event describes it. ``id`` is the provider's own and survives renames.

    ``archived`` is ``None`` when the event does not say.
    """

    provider: str
    id: str
    slug: str
    web_url: str
    default_branch: str | None = None
    archived: bool | None = None

    @property
    def key(self) -> str:
        return f"{self.provider}:{self.id}"


@dataclass(frozen=True, slots=True)
class Change:
    """Record ``repository`` (or its deletion); with ``refresh``, read its descriptor again at
    ``ref`` (a commit; ``None`` for the default branch)."""

    repository: Repository
    deleted: bool = False
    refresh: bool = False
    ref: str | None = None


class PayloadError(ValueError):
    """The payload lacks a field the catalog needs; the event is skipped with a warning."""


def change_of(event: Event, path: str) -> Change | None:
    """The change ``event`` makes to the catalog; ``path`` is the descriptor file's path."""
    try:
        if event.topic == "github.repository":
            return _github_repository(event.payload)
        if event.topic == "github.push":
            return _github_push(event.payload, path)
        if event.topic == "gitlab.push":
            return _gitlab_push(event.payload, path)
        if event.topic.startswith("gitlab.project_"):
            return _gitlab_project(event.payload, event.header("x-gitlab-instance"))
    except PayloadError as error:
        logger.warning("event %s on %s skipped: %s", event.id, event.topic, error)
    return None


def _github_repository(payload: Any) -> Change:
    repository = _github_repo(_mapping(payload, "repository"))
    action = _text(payload, "action")
    if action == "deleted":
        return Change(repository, deleted=True)
    return Change(repository, refresh=action == "created")


def _github_push(payload: Any, path: str) -> Change:
    repository = _github_repo(_mapping(payload, "repository"))
    head = payload.get("head_commit")
    head_id = head.get("id") if isinstance(head, Mapping) else None
    commits = _commits(payload)
    touched = len(commits) >= GITHUB_MAX_COMMITS or _touches(commits, path)
    refresh = _on_default_branch(payload, repository) and isinstance(head_id, str) and touched
    return Change(repository, refresh=refresh, ref=head_id if refresh else None)


def _github_repo(data: Mapping[str, Any]) -> Repository:
    archived = data.get("archived")
    return Repository(
        provider="github",
        id=str(_field(data, "id")),
        slug=_text(data, "full_name"),
        web_url=_text(data, "html_url"),
        default_branch=_optional_text(data, "default_branch"),
        archived=archived if isinstance(archived, bool) else None,
    )


def _gitlab_push(payload: Any, path: str) -> Change:
    project = _mapping(payload, "project")
    repository = Repository(
        provider="gitlab",
        id=str(_field(payload, "project_id")),
        slug=_text(project, "path_with_namespace"),
        web_url=_text(project, "web_url"),
        default_branch=_optional_text(project, "default_branch"),
    )
    head = payload.get("checkout_sha")
    commits = _commits(payload)
    total = payload.get("total_commits_count")
    truncated = isinstance(total, int) and total > len(commits)
    touched = truncated or _touches(commits, path)
    refresh = _on_default_branch(payload, repository) and isinstance(head, str) and touched
    return Change(repository, refresh=refresh, ref=head if refresh else None)


def _gitlab_project(payload: Any, instance: str | None) -> Change | None:
    event_name = _text(payload, "event_name")
    if event_name not in GITLAB_PROJECT_EVENTS:
        return None
    if not instance:
        raise PayloadError("no X-Gitlab-Instance header: the project's address is unknown")
    slug = _text(payload, "path_with_namespace")
    repository = Repository(
        provider="gitlab",
        id=str(_field(payload, "project_id")),
        slug=slug,
        web_url=f"{instance.rstrip('/')}/{slug}",
    )
    if event_name == "project_destroy":
        return Change(repository, deleted=True)
    return Change(repository, refresh=event_name == "project_create")


def _on_default_branch(payload: Mapping[str, Any], repository: Repository) -> bool:
    branch = repository.default_branch
    return branch is not None and payload.get("ref") == f"refs/heads/{branch}"


def _touches(commits: list[Mapping[str, Any]], path: str) -> bool:
    return any(
        path in (commit.get(kind) or ())
        for commit in commits
        for kind in ("added", "modified", "removed")
    )


def _commits(payload: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    commits = payload.get("commits") or []
    if not isinstance(commits, list):
        raise PayloadError("commits is not a list")
    return [commit for commit in commits if isinstance(commit, Mapping)]


def _mapping(data: Any, key: str) -> Mapping[str, Any]:
    value = _field(data, key)
    if not isinstance(value, Mapping):
        raise PayloadError(f"{key} is not an object")
    return value


def _field(data: Any, key: str) -> Any:
    if not isinstance(data, Mapping) or data.get(key) is None:
        raise PayloadError(f"the payload has no {key}")
    return data[key]


def _text(data: Any, key: str) -> str:
    value = _field(data, key)
    if not isinstance(value, str) or not value:
        raise PayloadError(f"{key} is not a non-empty string")
    return value


def _optional_text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value else None

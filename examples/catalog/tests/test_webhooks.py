"""The catalog kept up to date by signed GitHub and GitLab webhooks, through callboard's ingress."""

from __future__ import annotations

import copy

from support import (
    GITHUB_PUSH_HEAD,
    GITHUB_REPO,
    GITLAB_PUSH_HEAD,
    GITLAB_REPO,
    FakeFetcher,
    Running,
    descriptor,
    load,
)

PATH = "catalog-info.yaml"


def names(catalog: Running, key: str) -> list[str]:
    record = catalog.get(key)
    assert record is not None
    return [entity["metadata"]["name"] for entity in record.entities]


async def test_a_github_repository_from_creation_to_deletion(
    catalog: Running, fetcher: FakeFetcher
) -> None:
    fetcher.files[(GITHUB_REPO, None)] = descriptor("octo")
    fetcher.files[(GITHUB_REPO, GITHUB_PUSH_HEAD)] = descriptor("octo-api")

    assert (await catalog.post("github", "repository_created")).status_code == 202
    created = catalog.get(GITHUB_REPO)
    assert created is not None
    assert (created.slug, created.web_url, created.default_branch, created.archived) == (
        "octo-org/octo-repo",
        "https://github.com/octo-org/octo-repo",
        "main",
        False,
    )
    assert names(catalog, GITHUB_REPO) == ["octo"]

    await catalog.post("github", "push")
    assert names(catalog, GITHUB_REPO) == ["octo-api"]
    record = catalog.get(GITHUB_REPO)
    assert record is not None
    assert record.commit_ref == GITHUB_PUSH_HEAD

    await catalog.post("github", "repository_renamed")
    renamed = catalog.get(GITHUB_REPO)
    assert renamed is not None
    assert (renamed.slug, renamed.web_url) == (
        "octo-org/octo-service",
        "https://github.com/octo-org/octo-service",
    )
    assert names(catalog, GITHUB_REPO) == ["octo-api"]

    await catalog.post("github", "repository_archived")
    archived = catalog.get(GITHUB_REPO)
    assert archived is not None
    assert archived.archived

    await catalog.post("github", "repository_deleted")
    assert catalog.get(GITHUB_REPO) is None
    assert catalog.repositories() == []
    # The descriptor was read twice: at creation (default branch) and at the pushed commit.
    assert fetcher.calls == [(GITHUB_REPO, PATH, None), (GITHUB_REPO, PATH, GITHUB_PUSH_HEAD)]


async def test_a_gitlab_project_from_creation_to_deletion(
    catalog: Running, fetcher: FakeFetcher
) -> None:
    fetcher.files[(GITLAB_REPO, GITLAB_PUSH_HEAD)] = descriptor("diaspora")

    await catalog.post("gitlab", "project_create")
    created = catalog.get(GITLAB_REPO)
    assert created is not None
    assert (created.slug, created.web_url, created.entities) == (
        "mike/diaspora",
        "https://gitlab.example.com/mike/diaspora",
        (),
    )

    await catalog.post("gitlab", "push")
    assert names(catalog, GITLAB_REPO) == ["diaspora"]
    pushed = catalog.get(GITLAB_REPO)
    assert pushed is not None
    assert pushed.default_branch == "main"

    await catalog.post("gitlab", "project_rename")
    renamed = catalog.get(GITLAB_REPO)
    assert renamed is not None
    assert (renamed.slug, renamed.web_url) == (
        "mike/diaspora-web",
        "https://gitlab.example.com/mike/diaspora-web",
    )
    assert names(catalog, GITLAB_REPO) == ["diaspora"]
    # The rename came from a system hook, which names no branch: the push's one is kept.
    assert renamed.default_branch == "main"

    await catalog.post("gitlab", "project_destroy")
    assert catalog.repositories() == []
    assert fetcher.calls == [(GITLAB_REPO, PATH, None), (GITLAB_REPO, PATH, GITLAB_PUSH_HEAD)]


async def test_a_push_that_leaves_the_descriptor_alone_reads_nothing(
    catalog: Running, fetcher: FakeFetcher
) -> None:
    _, payload = load("github", "push")
    for commit in payload["commits"]:
        commit["modified"] = ["README.md"]
    await catalog.post("github", "push", payload=payload)
    record = catalog.get(GITHUB_REPO)
    # The repository is known from its push, with no entities, and nothing was fetched.
    assert record is not None
    assert (record.slug, record.entities) == ("octo-org/octo-repo", ())
    assert fetcher.calls == []


async def test_a_push_to_another_branch_reads_nothing(
    catalog: Running, fetcher: FakeFetcher
) -> None:
    _, payload = load("gitlab", "push")
    payload["ref"] = "refs/heads/feature"
    await catalog.post("gitlab", "push", payload=payload)
    assert fetcher.calls == []


async def test_a_long_gitlab_push_may_touch_the_descriptor(
    catalog: Running, fetcher: FakeFetcher
) -> None:
    _, payload = load("gitlab", "push")
    payload["commits"][0]["modified"] = ["README.md"]
    payload["total_commits_count"] = 40  # GitLab lists 20 commits at most
    fetcher.files[(GITLAB_REPO, GITLAB_PUSH_HEAD)] = descriptor("diaspora")
    await catalog.post("gitlab", "push", payload=payload)
    assert names(catalog, GITLAB_REPO) == ["diaspora"]


async def test_removing_the_descriptor_removes_the_entities(
    catalog: Running, fetcher: FakeFetcher
) -> None:
    fetcher.files[(GITHUB_REPO, GITHUB_PUSH_HEAD)] = descriptor("octo")
    await catalog.post("github", "push")
    assert names(catalog, GITHUB_REPO) == ["octo"]

    _, payload = load("github", "push")
    payload["head_commit"]["id"] = payload["commits"][0]["id"] = "a" * 40
    payload["commits"][0]["modified"] = []
    payload["commits"][0]["removed"] = [PATH]
    await catalog.post("github", "push", payload=payload, delivery="removal-1")
    assert names(catalog, GITHUB_REPO) == []


async def test_a_wrong_descriptor_is_kept_as_errors(catalog: Running, fetcher: FakeFetcher) -> None:
    fetcher.files[(GITHUB_REPO, GITHUB_PUSH_HEAD)] = "kind: [Component\n"
    await catalog.post("github", "push")
    record = catalog.get(GITHUB_REPO)
    assert record is not None
    assert record.entities == ()
    assert record.errors[0].startswith("not valid YAML:")


async def test_a_webhook_delivered_again_changes_nothing(
    catalog: Running, fetcher: FakeFetcher
) -> None:
    fetcher.files[(GITHUB_REPO, GITHUB_PUSH_HEAD)] = descriptor("octo")
    await catalog.post("github", "push")
    first = catalog.repositories()

    # GitHub's own redelivery (the same X-GitHub-Delivery) is published once ...
    again = await catalog.post("github", "push")
    assert again.status_code == 202
    assert len(fetcher.calls) == 1
    # ... and the same delivery under a new id is handled again, to the same catalog.
    await catalog.post("github", "push", delivery="8c0ad6ae-0000-4000-8000-000000000001")
    assert len(fetcher.calls) == 2
    assert catalog.repositories() == first


async def test_a_descriptor_that_cannot_be_read_is_read_again(
    catalog: Running, fetcher: FakeFetcher
) -> None:
    fetcher.failures = 1
    fetcher.files[(GITHUB_REPO, GITHUB_PUSH_HEAD)] = descriptor("octo")
    await catalog.post("github", "push")
    assert names(catalog, GITHUB_REPO) == ["octo"]
    assert len(fetcher.calls) == 2
    assert await catalog.board.events.dead_letters("catalog") == []


async def test_a_descriptor_that_never_can_be_read_ends_in_the_dead_letters(
    catalog: Running, fetcher: FakeFetcher
) -> None:
    fetcher.failures = 3  # every attempt
    await catalog.post("github", "push")
    [dead] = await catalog.board.events.dead_letters("catalog")
    assert dead.event.topic == "github.push"
    assert "unreachable" in dead.error
    # The repository itself was recorded before the read failed.
    record = catalog.get(GITHUB_REPO)
    assert record is not None
    assert record.entities == ()


async def test_an_unsigned_webhook_changes_nothing(catalog: Running, fetcher: FakeFetcher) -> None:
    response = await catalog.post("github", "repository_created", secret="not-the-secret")
    assert response.status_code == 403
    bad_token = await catalog.post("gitlab", "project_create", secret="not-the-token")
    assert bad_token.status_code == 403
    assert catalog.repositories() == []
    assert fetcher.calls == []


async def test_other_repository_actions_update_the_metadata(catalog: Running) -> None:
    _, payload = load("github", "repository_archived")
    await catalog.post("github", "repository_archived")
    unarchived = copy.deepcopy(payload)
    unarchived["action"] = "unarchived"
    unarchived["repository"]["archived"] = False
    unarchived["repository"]["default_branch"] = "trunk"
    await catalog.post("github", "repository_archived", payload=unarchived, delivery="u-1")
    record = catalog.get(GITHUB_REPO)
    assert record is not None
    assert (record.archived, record.default_branch) == (False, "trunk")

"""The HTTP fetcher against a loopback server standing in for GitHub's and GitLab's APIs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from catalog_provider import FetchError, HttpFetcher, Repository
from catalog_provider.fetchers import MAX_BYTES, GithubAccess, GitlabAccess

GITHUB = Repository(
    "github", "79929171", "octo-org/octo-repo", "https://github.com/octo-org/octo-repo"
)
GITLAB = Repository("gitlab", "15", "mike/diaspora", "https://gitlab.example.com/mike/diaspora")


@dataclass
class Api:
    """What the server answers, by request path (with its query), and what it was asked."""

    url: str
    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)


@pytest.fixture
def api() -> Iterator[Api]:
    state = Api("")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            status, body = state.answers.get(self.path, (404, b'{"message": "Not Found"}'))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_github_contents_at_a_commit(api: Api) -> None:
    api.answers["/repos/octo-org/octo-repo/contents/catalog-info.yaml?ref=abc123"] = (
        200,
        b"kind: Component\n",
    )
    fetcher = HttpFetcher(GithubAccess(api.url, "gh-token"))
    assert await fetcher.fetch(GITHUB, "catalog-info.yaml", "abc123") == "kind: Component\n"
    [(_, headers)] = api.seen
    assert headers["accept"] == "application/vnd.github.raw+json"
    assert headers["authorization"] == "Bearer gh-token"


async def test_github_default_branch_without_a_token(api: Api) -> None:
    api.answers["/repos/octo-org/octo-repo/contents/docs/catalog-info.yaml"] = (200, b"x: 1\n")
    fetcher = HttpFetcher(GithubAccess(api.url))
    assert await fetcher.fetch(GITHUB, "docs/catalog-info.yaml", None) == "x: 1\n"
    assert "authorization" not in api.seen[0][1]


async def test_gitlab_raw_file(api: Api) -> None:
    api.answers["/api/v4/projects/15/repository/files/docs%2Fcatalog-info.yaml/raw?ref=HEAD"] = (
        200,
        b"kind: Group\n",
    )
    fetcher = HttpFetcher(gitlab=GitlabAccess(api.url, "gl-token"))
    assert await fetcher.fetch(GITLAB, "docs/catalog-info.yaml", None) == "kind: Group\n"
    assert api.seen[0][1]["private-token"] == "gl-token"


async def test_gitlab_instance_from_the_repository_address(api: Api) -> None:
    here = Repository("gitlab", "15", "mike/diaspora", f"{api.url}/mike/diaspora")
    api.answers["/api/v4/projects/15/repository/files/catalog-info.yaml/raw?ref=abc"] = (200, b"")
    assert await HttpFetcher().fetch(here, "catalog-info.yaml", "abc") == ""


async def test_a_missing_file_is_none(api: Api) -> None:
    fetcher = HttpFetcher(GithubAccess(api.url), GitlabAccess(api.url))
    assert await fetcher.fetch(GITHUB, "catalog-info.yaml", "abc") is None
    assert await fetcher.fetch(GITLAB, "catalog-info.yaml", "abc") is None


async def test_refusals_and_failures_raise(api: Api) -> None:
    fetcher = HttpFetcher(GithubAccess(api.url))
    api.answers["/repos/octo-org/octo-repo/contents/catalog-info.yaml?ref=a"] = (401, b"{}")
    api.answers["/repos/octo-org/octo-repo/contents/catalog-info.yaml?ref=b"] = (502, b"{}")
    big = b"#" * (MAX_BYTES + 1)
    api.answers["/repos/octo-org/octo-repo/contents/catalog-info.yaml?ref=c"] = (200, big)
    with pytest.raises(FetchError, match=r"answered 401 .*check the token"):
        await fetcher.fetch(GITHUB, "catalog-info.yaml", "a")
    with pytest.raises(FetchError, match="answered 502"):
        await fetcher.fetch(GITHUB, "catalog-info.yaml", "b")
    with pytest.raises(FetchError, match="larger than"):
        await fetcher.fetch(GITHUB, "catalog-info.yaml", "c")


async def test_an_unreachable_api_raises() -> None:
    fetcher = HttpFetcher(GithubAccess("http://127.0.0.1:9"), timeout=5)
    with pytest.raises(FetchError, match="could not be read"):
        await fetcher.fetch(GITHUB, "catalog-info.yaml", "a")

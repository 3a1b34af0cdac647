"""Reading a descriptor file from the repository that holds it.

``Fetcher`` is the seam: the catalog asks it for one file of one repository at one commit. The
tests give it a fake; ``HttpFetcher`` reads the file from GitHub's and GitLab's REST APIs with
the standard library (blocking calls on a worker thread):

- GitHub: ``GET {apiUrl}/repos/{owner}/{name}/contents/{path}?ref={ref}`` with the raw media
  type (https://docs.github.com/en/rest/repos/contents#get-repository-content);
- GitLab: ``GET {url}/api/v4/projects/{id}/repository/files/{path}/raw?ref={ref}``
  (https://docs.gitlab.com/api/repository_files/#get-raw-file-from-repository).

A ``404`` means the file (or the commit) is not there: the repository declares no entities.
Anything else that is not a ``200`` raises ``FetchError``, so callboard retries the event with
backoff and, after the last attempt, keeps it in the subscription's dead letters.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Protocol

from catalog_provider.changes import Repository

#: A descriptor larger than this is refused rather than read into memory.
MAX_BYTES = 1024 * 1024


class Fetcher(Protocol):
    async def fetch(self, repository: Repository, path: str, ref: str | None) -> str | None:
        """The text of ``path`` in ``repository`` at ``ref`` (``None``: the default branch),
        or ``None`` when there is no such file."""
        ...


class FetchError(Exception):
    """A descriptor could not be read; the event is retried."""


@dataclass(frozen=True, slots=True)
class GithubAccess:
    api_url: str = "https://api.github.com"
    token: str | None = None


@dataclass(frozen=True, slots=True)
class GitlabAccess:
    #: ``None``: the instance the repository's address names.
    url: str | None = None
    token: str | None = None


class HttpFetcher:
    """Reads descriptors over the providers' REST APIs."""

    def __init__(
        self,
        github: GithubAccess = GithubAccess(),
        gitlab: GitlabAccess = GitlabAccess(),
        *,
        timeout: float = 10.0,
    ) -> None:
        self.github = github
        self.gitlab = gitlab
        self.timeout = timeout

    async def fetch(self, repository: Repository, path: str, ref: str | None) -> str | None:
        request = self.request(repository, path, ref)
        return await asyncio.to_thread(self._read, request)

    def request(self, repository: Repository, path: str, ref: str | None) -> urllib.request.Request:
        """The HTTP request that reads ``path`` of ``repository``."""
        query = "" if ref is None else "?" + urllib.parse.urlencode({"ref": ref})
        if repository.provider == "github":
            url = (
                f"{self.github.api_url.rstrip('/')}/repos/{_quote(repository.slug, '/')}"
                f"/contents/{_quote(path, '/')}{query}"
            )
            headers = {
                "Accept": "application/vnd.github.raw+json",
                "X-GitHub-Api-Version": "2022-11-28",
            }
            if self.github.token:
                headers["Authorization"] = f"Bearer {self.github.token}"
            return urllib.request.Request(url, headers=headers)
        if repository.provider == "gitlab":
            base = self.gitlab.url or _origin(repository.web_url)
            # GitLab wants a ref: HEAD is the default branch.
            query = "?" + urllib.parse.urlencode({"ref": ref or "HEAD"})
            url = (
                f"{base.rstrip('/')}/api/v4/projects/{_quote(repository.id, '')}"
                f"/repository/files/{_quote(path, '')}/raw{query}"
            )
            headers = {"PRIVATE-TOKEN": self.gitlab.token} if self.gitlab.token else {}
            return urllib.request.Request(url, headers=headers)
        raise FetchError(f"no way to read files of {repository.provider} repositories")

    def _read(self, request: urllib.request.Request) -> str | None:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body: bytes = response.read(MAX_BYTES + 1)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise FetchError(
                f"{request.full_url} answered {error.code} {error.reason}"
                + (
                    " (check the token in events.modules.catalog)"
                    if error.code in (401, 403)
                    else ""
                )
            ) from error
        except (urllib.error.URLError, OSError) as error:
            raise FetchError(f"{request.full_url} could not be read: {error}") from error
        if len(body) > MAX_BYTES:
            raise FetchError(f"{request.full_url} is larger than {MAX_BYTES} bytes")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise FetchError(f"{request.full_url} is not UTF-8 text") from error


def _quote(text: str, safe: str) -> str:
    return urllib.parse.quote(text, safe=safe)


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"

"""The topic grammar and topic patterns.

A topic is one or more non-empty segments joined by ``.`` (``github``, ``github.pull_request``).
Segments may hold any printable character except whitespace, ``.``, ``*`` and ``>``; provider
event names such as ``repo:push`` are valid segments.

A pattern is a topic in which a segment may be ``*`` (exactly one segment) and the last segment
may be ``>`` (one or more trailing segments), as in NATS. Topics that start with ``$`` are
reserved for callboard itself (dead letters); wildcards never match them, only an exact pattern
or a pattern whose first segment is spelled out does.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Generic, TypeVar

from callboard.errors import InvalidTopicError

SEPARATOR = "."
ONE = "*"
REST = ">"

_SEGMENT = re.compile(r"[^\s.*>]+")


def _check_printable(name: str) -> None:
    # ``\s`` lets NUL and other control characters through; no broker stores them alike.
    if not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        raise InvalidTopicError(name, f"control characters such as {bad!a} are not allowed")


def validate_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid concrete topic, else raise ``InvalidTopicError``."""
    if not topic:
        raise InvalidTopicError(topic, "a topic must not be empty")
    _check_printable(topic)
    for segment in topic.split(SEPARATOR):
        if not _SEGMENT.fullmatch(segment):
            raise InvalidTopicError(
                topic,
                "segments must be non-empty and hold no whitespace, '*' or '>'",
            )
    return topic


def join(*segments: str) -> str:
    """Join segments into one topic: ``join("github", "push") == "github.push"``."""
    return validate_topic(SEPARATOR.join(segments))


@dataclass(frozen=True, slots=True)
class TopicPattern:
    """A compiled topic pattern (``github.*``, ``gitlab.>``, ``plain``)."""

    pattern: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, pattern: str) -> TopicPattern:
        if not pattern:
            raise InvalidTopicError(pattern, "a pattern must not be empty")
        _check_printable(pattern)
        segments = tuple(pattern.split(SEPARATOR))
        for index, segment in enumerate(segments):
            if segment == ONE:
                continue
            if segment == REST:
                if index != len(segments) - 1:
                    raise InvalidTopicError(pattern, "'>' may only be the last segment")
                continue
            if not _SEGMENT.fullmatch(segment):
                raise InvalidTopicError(
                    pattern,
                    "segments must be non-empty, '*', '>' or hold no whitespace, '*' or '>'",
                )
        return cls(pattern, segments)

    @property
    def is_exact(self) -> bool:
        return ONE not in self.segments and REST not in self.segments

    def matches(self, topic: str) -> bool:
        if self.is_exact:
            return topic == self.pattern
        parts = topic.split(SEPARATOR)
        if parts[0].startswith("$") and self.segments[0] in (ONE, REST):
            return False
        for index, segment in enumerate(self.segments):
            if segment == REST:
                return len(parts) > index
            if index >= len(parts):
                return False
            if segment != ONE and segment != parts[index]:
                return False
        return len(parts) == len(self.segments)


class TopicMatcher:
    """Matches topics against a set of patterns, caching the answer per topic."""

    __slots__ = ("_cache", "_exact", "_wild", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        compiled = [TopicPattern.parse(p) for p in patterns]
        if not compiled:
            raise InvalidTopicError("", "at least one topic pattern is required")
        self.patterns: tuple[str, ...] = tuple(p.pattern for p in compiled)
        self._exact = frozenset(p.pattern for p in compiled if p.is_exact)
        self._wild = tuple(p for p in compiled if not p.is_exact)
        self._cache: dict[str, bool] = {}

    def __call__(self, topic: str) -> bool:
        if topic in self._exact:
            return True
        if not self._wild:
            return False
        hit = self._cache.get(topic)
        if hit is None:
            hit = any(p.matches(topic) for p in self._wild)
            if len(self._cache) < 10_000:
                self._cache[topic] = hit
        return hit


def normalize_patterns(topics: str | Sequence[str]) -> tuple[str, ...]:
    """Accept one pattern or several, validate them and return them as a tuple."""
    items = (topics,) if isinstance(topics, str) else tuple(topics)
    for item in items:
        TopicPattern.parse(item)
    if not items:
        raise InvalidTopicError("", "at least one topic pattern is required")
    return items


#: The topics an index remembers the answer for; others are looked up at every call.
_CACHED_TOPICS = 10_000

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Node(Generic[K]):
    """One segment position of ``TopicIndex``'s trie of wildcard patterns."""

    children: dict[str, _Node[K]] = field(default_factory=dict)
    #: The ``*`` child: any one segment.
    one: _Node[K] | None = None
    #: Entries whose pattern ends here with ``>``: one or more segments follow.
    rest: set[K] = field(default_factory=set)
    #: Entries whose pattern ends exactly here.
    ends: set[K] = field(default_factory=set)

    def is_empty(self) -> bool:
        return not (self.children or self.one or self.rest or self.ends)


class TopicIndex(Generic[K]):
    """Which of many entries (subscriptions, consumers, groups) have a pattern matching a topic.

    Exact names are kept in a dictionary and wildcard patterns in a trie over segments, with a
    ``*`` branch and ``>`` marks: a lookup is one dictionary step for the exact names and a walk
    along the topic's segments taking the exact and the ``*`` branch at each, so its cost grows
    with the topic's length and the entries that match, not with the number of entries or
    patterns. Entries are added and removed one at a time, each at the cost of its own patterns;
    answers are remembered per topic until the entries change. Matches ``TopicMatcher`` exactly,
    reserved ``$`` topics included: a wildcard in the first segment never matches them.
    """

    __slots__ = ("_cache", "_entries", "_exact", "_root")

    def __init__(self, entries: Mapping[K, Iterable[str]] | None = None) -> None:
        self._entries: dict[K, tuple[str, ...]] = {}
        self._exact: dict[str, set[K]] = {}
        self._root: _Node[K] = _Node()
        self._cache: dict[str, frozenset[K]] = {}
        for key, patterns in (entries or {}).items():
            self.add(key, patterns)

    @property
    def entries(self) -> Mapping[K, tuple[str, ...]]:
        """Each entry's patterns, as given (a read-only view)."""
        return MappingProxyType(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: K, patterns: Iterable[str]) -> None:
        """Index ``key`` under ``patterns``, in place of the patterns it had."""
        given = tuple(patterns)
        if self._entries.get(key) == given:
            return
        parsed = [TopicPattern.parse(p) for p in dict.fromkeys(given)]  # all valid, or no change
        self.remove(key)
        self._entries[key] = given
        self._cache.clear()
        for pattern in parsed:
            if pattern.is_exact:
                self._exact.setdefault(pattern.pattern, set()).add(key)
            else:
                self._mark(key, pattern.segments)

    def remove(self, key: K) -> None:
        """Forget ``key``; nothing happens if it is not indexed."""
        patterns = self._entries.pop(key, None)
        if patterns is None:
            return
        self._cache.clear()
        for pattern in dict.fromkeys(patterns):
            holders = self._exact.get(pattern)
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del self._exact[pattern]
            else:
                self._unmark(self._root, key, pattern.split(SEPARATOR), 0)

    def update(self, entries: Mapping[K, Iterable[str]]) -> None:
        """Hold exactly ``entries``, adding, changing and removing only what differs."""
        for key in [key for key in self._entries if key not in entries]:
            self.remove(key)
        for key, patterns in entries.items():
            self.add(key, patterns)

    def __call__(self, topic: str) -> frozenset[K]:
        """The entries with a pattern matching ``topic``."""
        hit = self._cache.get(topic)
        if hit is None:
            hit = self._find(topic)
            if len(self._cache) < _CACHED_TOPICS:
                self._cache[topic] = hit
        return hit

    def _find(self, topic: str) -> frozenset[K]:
        exact = self._exact.get(topic, ())
        if self._root.is_empty():
            return frozenset(exact)
        found = set(exact)
        parts = topic.split(SEPARATOR)
        self._walk(self._root, parts, 0, not parts[0].startswith("$"), found)
        return frozenset(found)

    def _walk(
        self, node: _Node[K], parts: list[str], index: int, wild: bool, found: set[K]
    ) -> None:
        if index == len(parts):
            found |= node.ends
            return
        if wild and node.rest:
            found |= node.rest
        exact = node.children.get(parts[index])
        if exact is not None:
            self._walk(exact, parts, index + 1, True, found)
        if wild and node.one is not None:
            self._walk(node.one, parts, index + 1, True, found)

    def _mark(self, key: K, segments: tuple[str, ...]) -> None:
        node = self._root
        for segment in segments:
            if segment == REST:
                node.rest.add(key)
                return
            if segment == ONE:
                if node.one is None:
                    node.one = _Node()
                node = node.one
            else:
                node = node.children.setdefault(segment, _Node())
        node.ends.add(key)

    def _unmark(self, node: _Node[K], key: K, segments: list[str], index: int) -> bool:
        """Take ``key`` off the node of its pattern, dropping the nodes left empty on the way;
        whether ``node`` is left empty."""
        if index == len(segments):
            node.ends.discard(key)
        elif segments[index] == REST:
            node.rest.discard(key)
        else:
            segment = segments[index]
            child = node.one if segment == ONE else node.children.get(segment)
            if child is not None and self._unmark(child, key, segments, index + 1):
                if segment == ONE:
                    node.one = None
                else:
                    del node.children[segment]
        return node.is_empty()

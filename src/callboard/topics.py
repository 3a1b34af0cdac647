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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

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


@dataclass(slots=True)
class _Node:
    """One segment position of ``TopicIndex``'s trie."""

    children: dict[str, _Node] = field(default_factory=dict)
    #: The ``*`` child: any one segment.
    one: _Node | None = None
    #: Subscriptions whose pattern ends here with ``>``: one or more segments follow.
    rest: set[str] = field(default_factory=set)
    #: Subscriptions whose pattern ends exactly here.
    ends: set[str] = field(default_factory=set)


class TopicIndex:
    """Which of many subscriptions match a topic, without trying each one's patterns.

    A trie over segments, with a ``*`` branch and ``>`` marks: a lookup follows the topic's
    segments, taking the exact and the ``*`` branch at each, so its cost grows with the topic's
    length and the wildcards on its way, not with the number of patterns (a subscription of
    100,000 topics costs one dictionary step per segment). Matches ``TopicMatcher`` exactly,
    reserved ``$`` topics included: a wildcard in the first segment never matches them.
    """

    __slots__ = ("_cache", "_root", "subscriptions")

    def __init__(self, subscriptions: Mapping[str, Iterable[str]]) -> None:
        self.subscriptions = {id: tuple(patterns) for id, patterns in subscriptions.items()}
        self._root = _Node()
        self._cache: dict[str, frozenset[str]] = {}
        for id, patterns in self.subscriptions.items():
            for pattern in patterns:
                self._add(id, TopicPattern.parse(pattern))

    def _add(self, id: str, pattern: TopicPattern) -> None:
        node = self._root
        for segment in pattern.segments:
            if segment == REST:
                node.rest.add(id)
                return
            if segment == ONE:
                if node.one is None:
                    node.one = _Node()
                node = node.one
            else:
                node = node.children.setdefault(segment, _Node())
        node.ends.add(id)

    def __call__(self, topic: str) -> frozenset[str]:
        """The ids of the subscriptions with a pattern matching ``topic``."""
        hit = self._cache.get(topic)
        if hit is None:
            found: set[str] = set()
            parts = topic.split(SEPARATOR)
            self._walk(self._root, parts, 0, not parts[0].startswith("$"), found)
            hit = frozenset(found)
            if len(self._cache) < 10_000:
                self._cache[topic] = hit
        return hit

    def _walk(self, node: _Node, parts: list[str], index: int, wild: bool, found: set[str]) -> None:
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

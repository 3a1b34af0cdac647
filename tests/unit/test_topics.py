from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callboard import InvalidTopicError
from callboard.topics import (
    TopicIndex,
    TopicMatcher,
    TopicPattern,
    join,
    normalize_patterns,
    validate_topic,
)


@pytest.mark.parametrize(
    "topic", ["github", "github.push", "bitbucketCloud.repo:push", "a.b.c.d", "$deadletter.x"]
)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    "topic", ["", ".", "github.", ".github", "a..b", "git hub", "github.*", "github.>", "a*b"]
)
def test_invalid_topics(topic: str) -> None:
    with pytest.raises(InvalidTopicError) as caught:
        validate_topic(topic)
    assert caught.value.topic == topic
    assert isinstance(caught.value, ValueError)


def test_join() -> None:
    assert join("github", "push") == "github.push"
    with pytest.raises(InvalidTopicError):
        join("github", "pull request")


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("github", "github", True),
        ("github", "github.push", False),
        ("github", "gitlab", False),
        ("github.*", "github.push", True),
        ("github.*", "github", False),
        ("github.*", "github.push.extra", False),
        ("*.push", "github.push", True),
        ("*.push", "gitlab.push", True),
        ("*.push", "github.pull", False),
        ("*", "github", True),
        ("*", "github.push", False),
        ("github.>", "github.push", True),
        ("github.>", "github.pull_request.opened", True),
        ("github.>", "github", False),
        ("github.>", "gitlab.push", False),
        (">", "anything.at.all", True),
        (">", "one", True),
        ("*.*.opened", "github.pull_request.opened", True),
        ("*.>", "github.push", True),
        ("*.>", "github", False),
        # Reserved topics are matched only when their first segment is spelled out.
        (">", "$deadletter.sub", False),
        ("*.sub", "$deadletter.sub", False),
        ("$deadletter.>", "$deadletter.sub", True),
        ("$deadletter.sub", "$deadletter.sub", True),
    ],
)
def test_pattern_matching(pattern: str, topic: str, expected: bool) -> None:
    assert TopicPattern.parse(pattern).matches(topic) is expected
    assert TopicMatcher([pattern])(topic) is expected


@pytest.mark.parametrize("pattern", ["", "github.>.push", "git*", "a..b", "a b", ">.x"])
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(InvalidTopicError):
        TopicPattern.parse(pattern)


def test_a_matcher_matches_any_of_its_patterns_and_caches() -> None:
    matcher = TopicMatcher(["plain", "github.*", "gitlab.>"])
    assert matcher.patterns == ("plain", "github.*", "gitlab.>")
    for _ in range(2):  # the second round is answered from the cache
        assert matcher("plain")
        assert matcher("github.push")
        assert matcher("gitlab.merge_request.open")
        assert not matcher("github")
        assert not matcher("bitbucket.push")


def test_a_matcher_needs_a_pattern() -> None:
    with pytest.raises(InvalidTopicError):
        TopicMatcher([])


def test_normalize_patterns() -> None:
    assert normalize_patterns("github") == ("github",)
    assert normalize_patterns(["github", "gitlab.*"]) == ("github", "gitlab.*")
    with pytest.raises(InvalidTopicError):
        normalize_patterns([])
    with pytest.raises(InvalidTopicError):
        normalize_patterns(["github", "bad topic"])


@pytest.mark.parametrize("name", ["a\x00b", "github.\x01push", "x\x7f", "a\u2028b"])
def test_control_characters_are_not_topics_or_patterns(name: str) -> None:
    with pytest.raises(InvalidTopicError, match="control characters"):
        validate_topic(name)
    with pytest.raises(InvalidTopicError, match="control characters"):
        TopicPattern.parse(name)


# -- the index of many subscriptions' patterns ---------------------------------------------------

_SEGMENTS = st.sampled_from(["a", "b", "c", "$x", "repo:push"])
_TOPICS = st.lists(_SEGMENTS, min_size=1, max_size=4).map(".".join)


@st.composite
def _patterns(draw: st.DrawFn) -> str:
    segments = draw(st.lists(st.one_of(_SEGMENTS, st.just("*")), min_size=1, max_size=4))
    if draw(st.booleans()):
        segments.append(">")
    return ".".join(segments)


@settings(max_examples=300, deadline=None)
@given(
    subscriptions=st.dictionaries(
        st.sampled_from(["s1", "s2", "s3", "s4"]), st.lists(_patterns(), min_size=1, max_size=5)
    ),
    topics=st.lists(_TOPICS, min_size=1, max_size=10),
)
def test_the_index_finds_what_every_matcher_finds(
    subscriptions: dict[str, list[str]], topics: list[str]
) -> None:
    index = TopicIndex(subscriptions)
    matchers = {id: TopicMatcher(patterns) for id, patterns in subscriptions.items()}
    for topic in topics * 2:  # the second round is answered from the cache
        assert index(topic) == {id for id, matches in matchers.items() if matches(topic)}


def test_the_index_keeps_reserved_topics_from_leading_wildcards() -> None:
    index = TopicIndex({"all": [">"], "any": ["*.x"], "dead": ["$deadletter.*"]})
    assert index("$deadletter.a") == {"dead"}
    assert index("a.x") == {"all", "any"}
    assert index("$a.x") == set()


_KEYS = st.sampled_from(["s1", "s2", "s3", "s4", "s5"])
_CHANGES = st.lists(
    st.one_of(
        st.tuples(st.just("add"), _KEYS, st.lists(_patterns(), max_size=4)),
        st.tuples(st.just("remove"), _KEYS, st.just([])),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(changes=_CHANGES, topics=st.lists(_TOPICS, min_size=1, max_size=8))
def test_the_index_follows_entries_added_and_removed(
    changes: list[tuple[str, str, list[str]]], topics: list[str]
) -> None:
    index: TopicIndex[str] = TopicIndex()
    held: dict[str, list[str]] = {}
    for change, key, patterns in changes:
        if change == "add":
            index.add(key, patterns)
            held[key] = patterns
        else:
            index.remove(key)
            held.pop(key, None)
        for topic in topics:  # answered afresh after every change, not from the cache
            assert index(topic) == {
                k for k, p in held.items() if any(TopicPattern.parse(x).matches(topic) for x in p)
            }
    assert dict(index.entries) == {k: tuple(p) for k, p in held.items()}
    assert len(index) == len(held)
    for key in held:
        index.remove(key)
    # Every node and exact name of the removed entries is gone, not just emptied.
    assert index._root.is_empty()
    assert not index._exact


def test_update_changes_only_what_differs() -> None:
    index = TopicIndex({"a": ["github.*"], "b": ["gitlab.>"], "c": ["plain"]})
    assert index("github.push") == {"a"}
    index.update({"a": ["github.*"], "b": ["github.>"], "d": ["plain"]})
    assert index("github.push") == {"a", "b"}
    assert index("gitlab.push") == frozenset()
    assert index("plain") == {"d"}
    assert dict(index.entries) == {"a": ("github.*",), "b": ("github.>",), "d": ("plain",)}


def test_an_invalid_pattern_leaves_the_index_as_it_was() -> None:
    index = TopicIndex({"a": ["github.*"]})
    with pytest.raises(InvalidTopicError):
        index.add("a", ["gitlab.*", "bad topic"])
    assert index("github.push") == {"a"}
    assert dict(index.entries) == {"a": ("github.*",)}


def test_a_lookup_walks_the_topics_way_not_every_pattern(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = {n: [f"tenant{n}.github.push", f"app{n}.*", f"svc{n}.*.>"] for n in range(1_000)}
    index = TopicIndex({**entries, -1: ["github.>"], -2: ["*.push"]})
    visited: list[int] = []
    walk = TopicIndex._walk

    def counting(self: TopicIndex[int], node: object, parts: list[str], *rest: object) -> None:
        visited.append(len(parts))
        walk(self, node, parts, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(TopicIndex, "_walk", counting)
    assert index("github.push") == {-1, -2}
    # The root, ``github``, ``*`` and ``*.push``: the nodes on the topic's way, whatever the
    # number of entries beside it.
    assert len(visited) == 4
    assert index("tenant7.github.push") == {7}
    assert index("app9.x") == {9}
    visited.clear()
    assert index("github.push") == {-1, -2}  # remembered: no walk
    assert visited == []

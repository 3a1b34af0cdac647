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

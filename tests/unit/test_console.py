"""The console's parts without HTTP: the ingress counts and the session cookie."""

from __future__ import annotations

from callboard.console.access import ConsoleAccess, csrf_matches, same_origin
from callboard.console.ingress_stats import IngressStats
from callboard.ingress.types import IngressOutcome

HOUR = 3600.0


def outcome(at: float, status: int = 202, topic: str = "github") -> IngressOutcome:
    reason = None if status == 202 else f"refused with {status}"
    return IngressOutcome(topic=topic, status=status, reason=reason, delivery_id="d", at=at)


def test_counts_cover_the_last_hour_only() -> None:
    now = [10 * HOUR]
    stats = IngressStats(clock=lambda: now[0])
    stats.request(outcome(now[0] - HOUR - 60))  # over an hour ago: not counted
    stats.request(outcome(now[0] - 120))
    stats.request(outcome(now[0] - 60, 403))
    stats.request(outcome(now[0], 403))
    stats.request(outcome(now[0], 202, "plain"))
    [github, plain] = stats.topics()
    assert (github.topic, github.accepted, github.refused) == ("github", 1, {403: 2})
    assert (plain.topic, plain.accepted, plain.refused_total) == ("plain", 1, 0)
    now[0] += HOUR  # an hour later, nothing is left
    assert stats.topics() == []
    assert [o.status for o in stats.refusals()] == [403, 403]


def test_the_last_refusals_are_kept_newest_first() -> None:
    stats = IngressStats(refusals=3)
    for n in range(5):
        stats.request(outcome(HOUR + n, 400 + n))
    stats.request(outcome(HOUR + 9))
    assert [o.status for o in stats.refusals()] == [404, 403, 402]


async def refuse(authorization: str | None) -> str | None:
    return None


def test_a_session_lasts_its_time_and_only_for_its_token() -> None:
    access = ConsoleAccess([("token-one-1", "one"), ("token-two-2", "two")], refuse)
    cookie = access.log_in("token-two-2", 1000.0)
    assert cookie is not None
    assert "token-two-2" not in cookie
    assert access.session_subject(cookie, 1000.0 + access.session_seconds) == "two"
    assert access.session_subject(cookie, 1001.0 + access.session_seconds) is None
    assert access.log_in("token-three", 1000.0) is None
    # Another configuration without that token: its sessions are over.
    assert ConsoleAccess([("token-one-1", "one")], refuse).session_subject(cookie, 1000.0) is None
    for broken in ("", "...", "a.b.c", cookie + "x", cookie.replace(".", "..", 1)):
        assert access.session_subject(broken, 1000.0) is None


def test_the_csrf_and_origin_checks() -> None:
    assert csrf_matches("abc", "abc")
    assert not csrf_matches("abc", "abd")
    assert not csrf_matches(None, "abc")
    assert not csrf_matches("", "")
    own = "http://callboard:7007"
    assert same_origin(own, None, own)
    assert not same_origin("http://evil.example", None, own)
    assert not same_origin("null", None, own)
    assert same_origin(None, own + "/console/live", own)
    assert not same_origin(None, "http://evil.example/console", own)
    assert same_origin(None, None, own)

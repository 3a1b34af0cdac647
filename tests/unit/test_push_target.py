"""A push target's handler against a sender the test scripts: outcomes, signing, metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson
import pytest

from callboard.errors import InvalidEventError, PushFailed, RetryLater
from callboard.events import Event
from callboard.metrics import Metrics
from callboard.providers import standard_webhooks
from callboard.push.breaker import State
from callboard.push.sender import Answer, Sender
from callboard.push.spec import BreakerPolicy, PushSpec
from callboard.push.target import Pusher
from callboard.testing import new_standard_webhooks_secret

SECRET = new_standard_webhooks_secret()


@dataclass
class Sent:
    url: str
    body: bytes
    headers: dict[str, str]
    timeout: float


class ScriptedSender(Sender):
    """Answers from a script: an ``Answer`` or an exception to raise, one per request."""

    def __init__(self, *script: Answer | Exception) -> None:
        super().__init__()
        self.script = list(script)
        self.sent: list[Sent] = []

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,
        *,
        guarded: bool = False,
    ) -> Answer:
        self.sent.append(Sent(url, body, dict(headers), timeout))
        step = self.script.pop(0) if self.script else Answer(204)
        if isinstance(step, Exception):
            raise step
        return step


def spec(**changes: object) -> PushSpec:
    values: dict[str, object] = {
        "name": "billing",
        "url": "http://receiver.example/in",
        "topics": ("billing",),
        "secrets": (SECRET,),
        "headers": (("x-team", "payments"),),
        "breaker": BreakerPolicy(2, 30.0),
        **changes,
    }
    return PushSpec(**values)  # type: ignore[arg-type]


def sample(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "callboard_push_requests_total", {"target": "billing", "outcome": outcome}
    )
    return value or 0.0


EVENT = Event(topic="billing", payload={"amount": 12})


async def test_a_2xx_is_an_ack_of_a_signed_json_post() -> None:
    sender, metrics = ScriptedSender(Answer(200)), Metrics()
    await Pusher(spec(), sender, metrics.push)(EVENT)
    (sent,) = sender.sent
    assert sent.url == "http://receiver.example/in"
    assert orjson.loads(sent.body) == {"amount": 12}
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["callboard-topic"] == "billing"
    assert sent.headers["x-team"] == "payments"
    assert sent.headers["webhook-id"] == EVENT.id
    assert abs(int(sent.headers["webhook-timestamp"]) - time.time()) < 5
    assert standard_webhooks.verify(sent.headers, sent.body, [SECRET]) is None
    assert sent.timeout == 10.0
    assert sample(metrics, "delivered") == 1


async def test_a_cloudevent_is_sent_signed_in_structured_mode() -> None:
    sender = ScriptedSender()
    await Pusher(spec(format="cloudevents", cloud_events_source="/b"), sender, Metrics().push)(
        EVENT
    )
    (sent,) = sender.sent
    assert sent.headers["content-type"].startswith("application/cloudevents+json")
    document = orjson.loads(sent.body)
    assert (document["id"], document["type"], document["source"]) == (EVENT.id, "billing", "/b")
    assert document["data"] == {"amount": 12}
    assert standard_webhooks.verify(sent.headers, sent.body, [SECRET]) is None


async def test_a_cloudevent_in_binary_mode_has_ce_headers() -> None:
    sender = ScriptedSender()
    pusher = Pusher(spec(format="cloudevents", cloud_events_mode="binary"), sender, Metrics().push)
    await pusher(EVENT)
    (sent,) = sender.sent
    assert sent.headers["ce-id"] == EVENT.id
    assert sent.headers["ce-type"] == "billing"
    assert orjson.loads(sent.body) == {"amount": 12}


@pytest.mark.parametrize(("status", "outcome"), [(500, "failed"), (404, "rejected")])
async def test_anything_else_raises_so_the_policy_retries(status: int, outcome: str) -> None:
    metrics = Metrics()
    with pytest.raises(PushFailed, match=f"answered {status}") as caught:
        await Pusher(spec(), ScriptedSender(Answer(status)), metrics.push)(EVENT)
    assert caught.value.status == status
    assert sample(metrics, outcome) == 1


async def test_retry_after_on_429_and_503_asks_for_a_later_retry_cut_to_the_maximum() -> None:
    sender = ScriptedSender(Answer(429, "7"), Answer(503, "86400"), Answer(503, "soon"))
    pusher = Pusher(
        spec(max_retry_after=60.0, breaker=BreakerPolicy(5, 1.0)), sender, Metrics().push
    )
    with pytest.raises(RetryLater) as caught:
        await pusher(EVENT)
    assert caught.value.delay == 7
    with pytest.raises(RetryLater) as caught:
        await pusher(EVENT)
    assert caught.value.delay == 60
    with pytest.raises(PushFailed):  # unreadable: an ordinary failure
        await pusher(EVENT)


async def test_a_timeout_and_an_unreachable_endpoint_are_counted_apart() -> None:
    metrics = Metrics()
    sender = ScriptedSender(
        PushFailed("no answer within 10s", timed_out=True), PushFailed("refused")
    )
    pusher = Pusher(spec(breaker=BreakerPolicy(5, 1.0)), sender, metrics.push)
    with pytest.raises(PushFailed, match=r"billing.*no answer") as caught:
        await pusher(EVENT)
    assert caught.value.timed_out
    with pytest.raises(PushFailed, match="refused"):
        await pusher(EVENT)
    assert (sample(metrics, "timeout"), sample(metrics, "unreachable")) == (1, 1)


async def test_the_breaker_opens_on_failures_and_fails_fast_without_sending() -> None:
    metrics = Metrics()
    sender = ScriptedSender(Answer(502), Answer(502))
    pusher = Pusher(spec(), sender, metrics.push)
    for _ in range(2):
        with pytest.raises(PushFailed):
            await pusher(EVENT)
    with pytest.raises(RetryLater, match="circuit breaker is open") as caught:
        await pusher(EVENT)
    assert 29 < caught.value.delay <= 30
    assert len(sender.sent) == 2
    assert sample(metrics, "circuit_open") == 1
    state = metrics.registry.get_sample_value("callboard_push_breaker_state", {"target": "billing"})
    assert state == State.OPEN.value


async def test_a_4xx_about_the_event_does_not_open_the_breaker() -> None:
    sender = ScriptedSender(Answer(400), Answer(400), Answer(400))
    pusher = Pusher(spec(), sender, Metrics().push)
    for _ in range(3):
        with pytest.raises(PushFailed):
            await pusher(EVENT)
    assert pusher.breaker.state is State.CLOSED


async def test_an_event_that_cannot_be_written_leaves_the_breaker_alone() -> None:
    sender = ScriptedSender()
    pusher = Pusher(spec(), sender, Metrics().push)
    with pytest.raises(TypeError):
        await pusher(Event(topic="billing", payload={"when": object()}))
    assert pusher.breaker.consecutive_failures == 0
    assert sender.sent == []


class HangingSender(Sender):
    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,
        *,
        guarded: bool = False,
    ) -> Answer:
        await asyncio.Event().wait()
        raise AssertionError("never answered")


async def test_a_cancelled_trial_does_not_keep_the_breaker_half_open() -> None:
    now = [0.0]
    pusher = Pusher(spec(), HangingSender(), Metrics().push, clock=lambda: now[0])
    pusher.breaker.failed()
    pusher.breaker.failed()
    now[0] = 31.0  # past the cool-down: the next delivery is the trial
    trial = asyncio.ensure_future(pusher(EVENT))
    await asyncio.sleep(0)
    assert pusher.breaker.state is State.HALF_OPEN
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert pusher.breaker.state is State.OPEN  # failed: another cool-down, then a new trial
    now[0] = 62.0
    assert pusher.breaker.admit() is None


async def test_configured_headers_never_rewrite_the_ones_callboard_writes() -> None:
    sender = ScriptedSender()
    rewriting = (("ce-type", "forged"), ("content-type", "text/plain"), ("x-team", "payments"))
    cloud = spec(format="cloudevents", cloud_events_mode="binary", headers=rewriting)
    await Pusher(cloud, sender, Metrics().push)(EVENT)
    await Pusher(spec(headers=(("callboard-topic", "forged"),)), sender, Metrics().push)(EVENT)
    binary, plain = sender.sent
    assert binary.headers["ce-type"] == "billing"
    assert binary.headers["content-type"] == "application/json"
    assert binary.headers["x-team"] == "payments"
    assert plain.headers["callboard-topic"] == "billing"


async def test_a_header_http_cannot_carry_fails_the_event_not_the_endpoint() -> None:
    attributes = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    poisoned = Event(
        topic="billing",
        payload="hi",
        metadata={f"ce-{k}": v for k, v in attributes.items()}
        | {"ce-datacontenttype": "text/plain\r\nx-injected: 1"},
    )
    sender = ScriptedSender()
    cloud = spec(format="cloudevents", cloud_events_mode="binary", breaker=BreakerPolicy(1, 30.0))
    pusher = Pusher(cloud, sender, Metrics().push)
    with pytest.raises(InvalidEventError, match="'content-type'") as caught:
        await pusher(poisoned)
    assert "x-injected" not in str(caught.value)
    assert sender.sent == []
    assert pusher.breaker.state is State.CLOSED


class GatedSender(ScriptedSender):
    """Holds the first request until ``gate`` is set."""

    def __init__(self, *script: Answer | Exception) -> None:
        super().__init__(*script)
        self.gate = asyncio.Event()

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,
        *,
        guarded: bool = False,
    ) -> Answer:
        if not self.sent:
            await self.gate.wait()
        return await super().post(url, body, headers, timeout, guarded=guarded)


async def test_deliveries_wait_for_the_half_open_trial_without_spending_an_attempt() -> None:
    now = [0.0]
    sender = GatedSender(Answer(204), Answer(204))
    pusher = Pusher(
        spec(breaker=BreakerPolicy(1, 0.01)), sender, Metrics().push, clock=lambda: now[0]
    )
    pusher.breaker.failed()
    now[0] = 1.0  # past the cool-down: the next delivery is the trial
    trial = asyncio.ensure_future(pusher(EVENT))
    await asyncio.sleep(0)
    assert pusher.breaker.state is State.HALF_OPEN
    other = asyncio.ensure_future(pusher(Event(topic="billing", payload={"amount": 1})))
    await asyncio.sleep(0.05)
    assert not other.done()  # waiting for the trial, not failed with a RetryLater
    sender.gate.set()
    await trial
    await other  # the trial succeeded: sent
    assert len(sender.sent) == 2
    assert pusher.breaker.state is State.CLOSED

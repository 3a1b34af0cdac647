"""The push targets' circuit breaker, on a clock the test moves."""

from __future__ import annotations

import pytest

from callboard.push.breaker import CircuitBreaker, State


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def changes() -> list[tuple[State, State]]:
    return []


def breaker(clock: Clock, changes: list[tuple[State, State]]) -> CircuitBreaker:
    return CircuitBreaker(3, 10.0, clock=clock, on_change=lambda a, b: changes.append((a, b)))


def test_it_opens_after_the_threshold_of_failures_in_a_row(
    changes: list[tuple[State, State]],
) -> None:
    clock = Clock()
    circuit = breaker(clock, changes)
    circuit.failed()
    circuit.failed()
    circuit.succeeded()  # a success in between starts the count again
    circuit.failed()
    circuit.failed()
    assert circuit.state is State.CLOSED
    assert circuit.admit() is None
    circuit.failed()
    assert circuit.state is State.OPEN
    assert changes == [(State.CLOSED, State.OPEN)]
    clock.now = 4.0
    assert circuit.admit() == pytest.approx(6.0)  # fails fast, saying how long to wait


def test_after_the_cool_down_one_trial_goes_and_its_success_closes_it(
    changes: list[tuple[State, State]],
) -> None:
    clock = Clock()
    circuit = breaker(clock, changes)
    for _ in range(3):
        circuit.failed()
    clock.now = 10.0
    assert circuit.admit() is None  # the trial
    assert circuit.state is State.HALF_OPEN
    wait = circuit.admit()  # the others wait while the trial is out
    assert wait is not None
    assert wait > 0
    circuit.succeeded()
    assert circuit.state is State.CLOSED
    assert circuit.admit() is None
    assert changes == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]


def test_a_failed_trial_opens_it_for_another_cool_down(
    changes: list[tuple[State, State]],
) -> None:
    clock = Clock()
    circuit = breaker(clock, changes)
    for _ in range(3):
        circuit.failed()
    clock.now = 10.0
    assert circuit.admit() is None
    circuit.failed()
    assert circuit.state is State.OPEN
    clock.now = 15.0
    assert circuit.admit() == pytest.approx(5.0)
    clock.now = 20.0
    assert circuit.admit() is None
    assert changes[-1] == (State.OPEN, State.HALF_OPEN)
    assert len(changes) == 4  # each change heard once


def test_it_needs_a_threshold_and_a_cool_down() -> None:
    with pytest.raises(ValueError, match="failures"):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError, match="cool-down"):
        CircuitBreaker(1, 0)

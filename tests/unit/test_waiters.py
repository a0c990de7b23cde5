"""The waiter helper: fired by key (and mark), and a cancelled waiter leaves at once."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.python.failure import Failure

from oxide_cluster.waiters import Waiters


def test_a_timed_out_waiter_is_unregistered_before_the_key_fires() -> None:
    clock = task.Clock()
    waiters: Waiters[str, str] = Waiters()
    polled = waiters.wait("t1")
    polled.addTimeout(5, clock)
    timed_out: list = []
    polled.addErrback(lambda failure: timed_out.append(failure.check(defer.TimeoutError)))
    kept = waiters.wait("t1")
    assert waiters.count("t1") == 2
    clock.advance(5)
    assert timed_out == [defer.TimeoutError] and waiters.count("t1") == 1
    fired: list = []
    kept.addCallback(fired.append)
    waiters.fire("t1", "done")
    assert fired == ["done"] and waiters.count() == 0


def test_fire_wakes_only_the_ready_marks_and_keeps_the_rest() -> None:
    waiters: Waiters[str, None] = Waiters()
    low, high = waiters.wait("t1", 10), waiters.wait("t1", 100)
    waiters.fire("t1", None, lambda offset: isinstance(offset, int) and offset < 50)
    assert low.called and not high.called and waiters.count("t1") == 1
    waiters.fire("t1", None)
    assert high.called and waiters.count() == 0


def test_a_waiter_added_while_firing_waits_for_the_next_fire() -> None:
    waiters: Waiters[str, int] = Waiters()
    again: list = []
    waiters.wait("t1").addCallback(lambda _: again.append(waiters.wait("t1")))
    waiters.fire("t1", 1)
    assert len(again) == 1 and not again[0].called and waiters.count("t1") == 1


def test_a_failure_errbacks_every_waiter_of_the_key() -> None:
    waiters: Waiters[str, int] = Waiters()
    first, second, other = waiters.wait("pass"), waiters.wait("pass"), waiters.wait("x")
    errors: list = []
    for waiter in (first, second):
        waiter.addErrback(lambda failure: errors.append(failure.check(ValueError)))
    waiters.fire("pass", Failure(ValueError("broken")))
    assert errors == [ValueError, ValueError] and not other.called
    assert waiters.count() == 1

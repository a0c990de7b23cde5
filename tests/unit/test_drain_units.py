"""Drain deadlines and the drain at stop, with a Clock and a real executor."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task

from oxide_cluster.drain import DrainOnStop
from oxide_cluster.model import TaskState
from tests.unit.test_capacity import Node


def test_a_drain_deadline_cancels_what_still_runs_and_resume_disarms_it():
    node = Node()
    first: list[Any] = []
    node.run("sleep 100").addBoth(first.append)
    node.scheduler.drain(30)
    assert node.scheduler.drain_state.deadline == node.clock.seconds() + 30
    node.clock.advance(29)
    assert first[0].state is TaskState.RUNNING
    node.clock.advance(1)
    node.processes[0].exit(signal_number=15)
    ended = node.store.tasks[first[0].id]
    assert ended.state is TaskState.CANCELLED and "drain deadline" in ended.reason
    node.scheduler.resume()
    second: list[Any] = []
    node.scheduler.drain(10)
    node.scheduler.resume()  # the deadline goes with the drain
    node.run("sleep 100").addBoth(second.append)
    node.clock.advance(60)
    assert second[0].state is TaskState.RUNNING
    assert node.scheduler.drain_state.deadline is None


class Stopping:
    def __init__(self, running: int) -> None:
        self.running = running
        self.drained = 0
        self.idle: defer.Deferred[None] = defer.Deferred()


def _service(clock: task.Clock, state: Stopping, grace: float) -> DrainOnStop:
    def drain() -> None:
        state.drained += 1

    service = DrainOnStop(clock, grace, drain, lambda: state.running, lambda: state.idle)
    service.startService()
    return service


def test_a_stop_drains_and_waits_for_running_tasks_up_to_the_grace():
    clock, state = task.Clock(), Stopping(running=2)
    stopped = _service(clock, state, 60).stopService()
    assert state.drained == 1 and not stopped.called
    clock.advance(59)
    assert not stopped.called
    state.idle.callback(None)  # they finished in time
    assert stopped.called


def test_the_grace_ends_the_wait_and_a_stop_without_tasks_or_grace_is_immediate():
    clock, state = task.Clock(), Stopping(running=1)
    stopped = _service(clock, state, 5).stopService()
    clock.advance(5)
    assert stopped.called  # the executor then cancels what is left
    state.idle.callback(None)  # late: harmless
    for running, grace in ((0, 60), (3, 0)):
        quick = Stopping(running)
        assert _service(clock, quick, grace).stopService().called and quick.drained == 0

"""The leader's dispatch loop of a Redis cluster, with a Clock and an in-memory backend."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from oxide_cluster.cluster_queue import (
    AlreadyAdmitted,
    ClusterDispatcher,
    Entry,
    Outcome,
    parse_dispatch,
)
from oxide_cluster.model import RequestError
from oxide_cluster.placement import Candidate


class FakeQueue:
    """The Redis scripts' semantics in memory: queued ids by seq, one claim per id."""

    def __init__(self) -> None:
        self.seq = 0
        self.queued: dict[str, tuple[int, dict[str, Any]]] = {}
        self.states: dict[str, str] = {}

    def enqueue(self, task_id: str, record: dict[str, Any]) -> defer.Deferred[int]:
        if task_id in self.states:
            return defer.succeed(0)
        self.seq += 1
        self.queued[task_id] = (self.seq, dict(record))
        self.states[task_id] = "queued"
        return defer.succeed(self.seq)

    def claim(self, task_id: str, node_id: str) -> defer.Deferred[str | None]:
        if self.states.get(task_id, "queued") != "queued":
            return defer.succeed(self.states[task_id])
        self.states[task_id] = f"started {node_id}"
        self.queued.pop(task_id, None)
        return defer.succeed(None)

    def end_queued(self, task_id: str, state: str, reason: str,
                   at: float) -> defer.Deferred[bool]:
        if self.states.get(task_id) != "queued":
            return defer.succeed(False)
        self.states[task_id] = state
        self.queued.pop(task_id)
        return defer.succeed(True)

    def scan(self, after: int, limit: int) -> defer.Deferred[list[tuple[int, str, dict]]]:
        found = sorted((seq, task_id, record) for task_id, (seq, record) in self.queued.items()
                       if seq > after)
        return defer.succeed(found[:limit])

    def where(self, task_id: str) -> defer.Deferred[Entry | None]:
        return defer.succeed(None)

    def position(self, task_id: str) -> defer.Deferred[int | None]:
        return defer.succeed(None)

    def hold_key(self, key: str, task_id: str, ttl: float) -> defer.Deferred[str]:
        return defer.succeed(task_id)


class Nodes:
    """Nodes with slots; ``send`` claims like a real target and holds the slot."""

    def __init__(self, queue: FakeQueue, slots: dict[str, int]) -> None:
        self.queue = queue
        self.slots = dict(slots)
        self.running: dict[str, list[str]] = {name: [] for name in slots}
        self.started: list[str] = []
        self.refuse_as_deposed = False

    def candidates(self) -> list[Candidate]:
        return [Candidate(name, self.slots[name] - len(self.running[name]), 0.0, 0.0, {})
                for name in self.slots]

    def send(self, node_id: str, record: dict[str, Any]) -> defer.Deferred[Outcome]:
        if self.refuse_as_deposed:
            return defer.succeed(Outcome.DEPOSED)
        if len(self.running[node_id]) >= self.slots[node_id]:
            return defer.succeed(Outcome.BUSY)
        why = self.queue.claim(record["id"], node_id).result
        if why is not None:
            return defer.succeed(Outcome.GONE)
        self.running[node_id].append(record["id"])
        self.started.append(record["id"])
        return defer.succeed(Outcome.STARTED)

    def finish_all(self) -> None:
        for tasks in self.running.values():
            tasks.clear()


def record(task_id: str, priority: int = 0, group: str = "g", created: float = 0.0,
           timeout: float = 3600.0) -> dict[str, Any]:
    return {"id": task_id, "request": {"command": "true"}, "priority": priority,
            "group": group, "created_at": created, "queue_timeout": timeout}


@pytest.fixture
def setup():
    clock = Clock()
    queue = FakeQueue()
    nodes = Nodes(queue, {"a": 1, "b": 1})
    leading = {"now": True}
    dispatcher = ClusterDispatcher(clock, queue, is_leader=lambda: leading["now"],
                                   candidates=nodes.candidates, send=nodes.send,
                                   default_queue_timeout=60, interval=0.1)
    dispatcher.startService()
    yield clock, queue, nodes, leading, dispatcher
    dispatcher.stopService()


def test_dispatches_as_slots_free_in_priority_then_group_turns(setup):
    clock, queue, nodes, _, _ = setup
    for index in range(4):
        queue.enqueue(f"big{index}", record(f"big{index}", group="big"))
    queue.enqueue("small", record("small", group="small"))
    queue.enqueue("urgent", record("urgent", priority=5, group="big"))
    clock.advance(0.1)
    assert nodes.started == ["urgent", "big0"]  # two slots: priority first
    nodes.finish_all()
    clock.advance(0.1)
    assert nodes.started[2:] == ["small", "big1"]  # the small group's turn comes next
    assert "small" not in queue.queued


def test_a_follower_dispatches_nothing_and_a_new_leader_reads_the_whole_queue(setup):
    clock, queue, nodes, leading, dispatcher = setup
    leading["now"] = False
    for index in range(3):
        queue.enqueue(f"t{index}", record(f"t{index}"))
    clock.advance(1)
    assert nodes.started == [] and len(dispatcher) == 0
    leading["now"] = True
    clock.advance(0.1)
    assert nodes.started == ["t0", "t1"]
    assert len(dispatcher) == 1


def test_a_claimed_id_is_never_dispatched_again(setup):
    clock, queue, nodes, _, _ = setup
    queue.enqueue("t0", record("t0"))
    queue.claim("t0", "elsewhere")  # a deposed leader's placement got there first
    queue.queued["t0"] = (1, record("t0"))  # and a stale scan still lists it
    clock.advance(0.1)
    assert nodes.started == [] and queue.states["t0"] == "started elsewhere"


def test_busy_node_leaves_the_task_queued_for_the_next_round(setup):
    clock, queue, nodes, _, dispatcher = setup
    nodes.slots = {"a": 1}
    nodes.running = {"a": []}
    queue.enqueue("t0", record("t0"))
    sends: list[str] = []
    real_send = nodes.send

    def flaky(node_id: str, task: dict[str, Any]) -> defer.Deferred[Outcome]:
        sends.append(task["id"])
        if len(sends) == 1:
            return defer.succeed(Outcome.BUSY)  # its announcement was stale
        return real_send(node_id, task)
    dispatcher._send = flaky
    clock.advance(0.1)
    assert nodes.started == [] and len(dispatcher) == 1
    clock.advance(0.1)
    assert nodes.started == ["t0"] and sends == ["t0", "t0"]


def test_queue_timeout_rejects_a_task_no_node_took(setup):
    clock, queue, nodes, _, dispatcher = setup
    nodes.slots = {"a": 0, "b": 0}
    queue.enqueue("t0", record("t0", timeout=5))
    clock.advance(0.1)
    assert queue.states["t0"] == "queued"
    clock.pump([0.1] * 60)
    assert queue.states["t0"] == "rejected" and dispatcher.rejected == 1
    assert nodes.started == []


def test_a_deposed_answer_stops_dispatching_until_the_queue_is_read_again(setup):
    clock, queue, nodes, _, dispatcher = setup
    nodes.refuse_as_deposed = True
    queue.enqueue("t0", record("t0"))
    clock.advance(0.1)
    assert len(dispatcher) == 0 and queue.states["t0"] == "queued"


def test_dispatch_body_is_checked():
    with pytest.raises(RequestError, match="version"):
        parse_dispatch({"version": 2, "task": {"id": "x", "request": {}}})
    with pytest.raises(RequestError, match="token"):
        parse_dispatch({"version": 1, "token": "7", "task": {"id": "x", "request": {}}})
    with pytest.raises(RequestError, match="unknown"):
        parse_dispatch({"version": 1, "task": {"id": "x", "request": {}}, "extra": 1})
    assert parse_dispatch({"version": 1, "token": 3, "task": {"id": "x", "request": {}}}) \
        == (3, {"id": "x", "request": {}})


def test_already_admitted_says_where():
    error = AlreadyAdmitted("t1", "started n2")
    assert error.node == "n2" and "never started twice" in str(error)

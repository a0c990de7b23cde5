"""``?wait`` on a task queued in Redis, with a Clock: the poll that tells waiters a task
left the queue, and the router following the task to where it runs."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectError
from twisted.internet.task import Clock

from oxide_cluster.cluster_queue import Entry, QueueUnavailable
from oxide_cluster.forwarding import PeerReply
from oxide_cluster.model import TaskState
from oxide_cluster.queue_waits import QueueWaits
from oxide_cluster.routing import Admitted, Queued, Relayed
from tests.unit.test_cluster_queue import FakeQueue, record
from tests.unit.test_routing import FakeElector, FakePeers, cluster_router, result
from tests.unit.test_scheduler import make_rig


class States:
    """``states`` from a dict, counting the calls (one per poll)."""

    def __init__(self) -> None:
        self.state: dict[str, str] = {}
        self.calls = 0
        self.down = False

    def states(self, task_ids: list[str]) -> defer.Deferred[list[str | None]]:
        self.calls += 1
        if self.down:
            return defer.fail(QueueUnavailable(str(ConnectError("No route to host"))))
        return defer.succeed([self.state.get(task_id) for task_id in task_ids])


def test_a_waiter_fires_once_the_task_is_started_and_the_poll_then_stops():
    clock, backend = Clock(), States()
    waits = QueueWaits(clock, backend)
    backend.state["t1"] = "queued"
    fired: list[Any] = []
    waits.left_queue("t1", 30).addBoth(fired.append)
    clock.advance(5)
    assert fired == [] and waits.polling
    backend.state["t1"] = "started"
    clock.advance(1)  # backed off to at most one poll a second
    assert fired == ["started"]
    assert waits.count() == 0 and not waits.polling


def test_a_timed_out_waiter_is_unregistered_at_its_timeout_and_leaves_no_poll():
    clock, backend = Clock(), States()
    waits = QueueWaits(clock, backend)
    backend.state["t1"] = "queued"
    fired: list[Any] = []
    waits.left_queue("t1", 10).addBoth(fired.append)
    clock.advance(10)
    assert fired == ["queued"]
    assert waits.count() == 0 and not waits.polling
    polls = backend.calls
    clock.advance(60)
    assert backend.calls == polls  # nobody waits: Redis is not asked


def test_polls_back_off_while_nothing_moves_and_ask_about_every_waiter_at_once():
    clock, backend = Clock(), States()
    waits = QueueWaits(clock, backend)
    for index in range(50):
        backend.state[f"t{index}"] = "queued"
        waits.left_queue(f"t{index}", 60)
    for _ in range(600):
        clock.advance(0.05)
    # 30 s: 0.05, 0.1, ... doubling up to 1 s, then one a second, each for all 50 ids.
    assert 25 <= backend.calls <= 40, backend.calls
    assert waits.count() == 50


def test_redis_away_keeps_the_waiter_until_it_answers():
    clock, backend = Clock(), States()
    waits = QueueWaits(clock, backend)
    backend.state["t1"] = "queued"
    backend.down = True
    fired: list[Any] = []
    waits.left_queue("t1", 30).addBoth(fired.append)
    clock.advance(5)
    assert fired == [] and backend.calls > 0
    backend.down = False
    backend.state["t1"] = "rejected"
    clock.advance(1)
    assert fired == ["rejected"]


# -- the router: where a waited-on task went ---------------------------------------------------


class WhereQueue(FakeQueue):
    """FakeQueue whose ``where`` answers like the Redis hash (state, node, record)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, dict[str, Any]] = {}

    def enqueue(self, task_id: str, record: dict[str, Any]) -> defer.Deferred[int]:
        self.records[task_id] = dict(record)
        return super().enqueue(task_id, record)

    def where(self, task_id: str) -> defer.Deferred[Entry | None]:
        found = self.state_of.get(task_id)
        if found is None:
            return defer.succeed(None)
        state, _, node = found.partition(" ")
        return defer.succeed(Entry(state, node or None, None, None, self.records[task_id]))


def queued_router(peers: FakePeers) -> tuple[Any, WhereQueue, Any]:
    rig = make_rig(slots=0)
    queue = WhereQueue()
    target = cluster_router(rig, peers, FakeElector(is_leader=False, leader_id="b"), queue)
    queue.enqueue("t1", {**record("t1"), "created_at": rig.clock.seconds()})
    return rig, queue, target


def task_reply(state: str) -> PeerReply:
    return PeerReply(200, {}, json.dumps({"id": "t1", "state": state,
                                          "exit_code": 0}).encode())


def test_a_waited_task_started_elsewhere_is_waited_on_at_its_node_for_the_time_left():
    peers = FakePeers({"b": task_reply("succeeded")})
    rig, queue, target = queued_router(peers)
    waited = defer.Deferred.fromCoroutine(target.when_finished("t1", 30))
    rig.clock.advance(4)
    assert not waited.called and peers.sent == []
    queue.claim("t1", "b")
    rig.clock.advance(1)
    routed = result(waited)
    assert isinstance(routed, Relayed) and routed.reply.status == 200
    [(node_id, path, _)] = peers.sent
    assert node_id == "b" and path.startswith(b"/task/t1?wait=")
    assert 24.5 <= float(path.split(b"=")[1]) <= 26  # the rest of the 30 s, not 30 again


def test_a_submit_left_queued_answers_202_while_its_node_still_runs_it():
    peers = FakePeers({"b": task_reply("running")})
    rig, queue, target = queued_router(peers)
    found = result(defer.Deferred.fromCoroutine(target.find("t1")))
    settled = defer.Deferred.fromCoroutine(target.settle_submit(Queued(found[0], 1), 30))
    queue.claim("t1", "b")
    rig.clock.advance(1)
    routed = result(settled)
    assert isinstance(routed, Relayed) and routed.reply.status == 202


def test_a_task_still_queued_at_the_timeout_is_answered_queued_and_forgotten():
    rig, _, target = queued_router(FakePeers({}))
    waited = defer.Deferred.fromCoroutine(target.when_finished("t1", 10))
    rig.clock.advance(9.9)
    assert not waited.called
    rig.clock.advance(0.1)
    routed = result(waited)
    assert isinstance(routed, Queued) and routed.task.state is TaskState.QUEUED
    assert target._waits.count() == 0 and not target._waits.polling


def test_a_task_ended_in_the_queue_answers_with_its_end():
    rig, queue, target = queued_router(FakePeers({}))
    waited = defer.Deferred.fromCoroutine(target.when_finished("t1", 30))
    rig.clock.advance(2)
    queue.end_queued("t1", "cancelled", "cancelled by request", rig.clock.seconds())
    rig.clock.advance(1)
    routed = result(waited)
    assert isinstance(routed, Admitted) and routed.task.state is TaskState.CANCELLED


def test_a_submit_the_leader_queued_is_followed_from_the_node_it_entered():
    peers = FakePeers({"b": task_reply("succeeded")})
    rig, queue, target = queued_router(peers)
    leader_said = PeerReply(202, {}, json.dumps({"id": "t1", "state": "queued"}).encode())
    settled = defer.Deferred.fromCoroutine(target.settle_submit(Relayed(leader_said), 30))
    rig.clock.advance(2)
    assert not settled.called
    queue.claim("t1", "b")
    rig.clock.advance(1)
    routed = result(settled)
    assert isinstance(routed, Relayed) and routed.reply.status == 200
    assert json.loads(routed.reply.body)["exit_code"] == 0
    running = PeerReply(202, {}, json.dumps({"id": "t2", "state": "running"}).encode())
    untouched = Relayed(running)  # not queued: answered as it came, no wait
    assert result(defer.Deferred.fromCoroutine(target.settle_submit(untouched, 30))) \
        is untouched

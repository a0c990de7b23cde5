"""The leader's dispatch loop of a Redis cluster, with a Clock and an in-memory backend."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectError
from twisted.internet.task import Clock

from oxide_cluster.cluster_queue import (
    LOST_REASON,
    WAITING,
    AdmittedWatch,
    AlreadyAdmitted,
    ClusterAdmission,
    ClusterDispatcher,
    Entry,
    First,
    Outcome,
    QueueUnavailable,
    RedisQueueBackend,
    parse_dispatch,
)
from oxide_cluster.executor import CapacityError
from oxide_cluster.model import RequestError, Task, parse_task_request
from oxide_cluster.placement import Candidate


class FakeQueue:
    """The Redis scripts' semantics in memory: queued ids by seq, one claim per id."""

    def __init__(self) -> None:
        self.seq = 0
        self.queued: dict[str, tuple[int, dict[str, Any]]] = {}
        self.state_of: dict[str, str] = {}

    def enqueue(self, task_id: str, record: dict[str, Any]) -> defer.Deferred[int]:
        if task_id in self.state_of:
            return defer.succeed(0)
        self.seq += 1
        self.queued[task_id] = (self.seq, dict(record))
        self.state_of[task_id] = "queued"
        return defer.succeed(self.seq)

    def claim(self, task_id: str, node_id: str) -> defer.Deferred[str | None]:
        if self.state_of.get(task_id, "queued") != "queued":
            return defer.succeed(self.state_of[task_id])
        self.state_of[task_id] = f"started {node_id}"
        self.queued.pop(task_id, None)
        return defer.succeed(None)

    def claim_first(self, task_id: str, node_id: str) -> defer.Deferred[str | None]:
        if self.queued:
            return defer.succeed(WAITING)
        if task_id in self.state_of:
            return defer.succeed(self.state_of[task_id])
        self.state_of[task_id] = f"started {node_id}"
        return defer.succeed(None)

    def waiting(self) -> defer.Deferred[bool]:
        return defer.succeed(bool(self.queued))

    def end_queued(self, task_id: str, state: str, reason: str,
                   at: float) -> defer.Deferred[bool]:
        if self.state_of.get(task_id) != "queued":
            return defer.succeed(False)
        self.state_of[task_id] = state
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

    def release_key(self, key: str, task_id: str) -> defer.Deferred[bool]:
        return defer.succeed(False)

    def retire(self, task_id: str, record: Mapping[str, Any], reason: str,
               at: float) -> defer.Deferred[str | None]:
        return defer.succeed(self.state_of.get(task_id))

    def states(self, task_ids: list[str]) -> defer.Deferred[list[str | None]]:
        return defer.succeed([self.state_of.get(t, "").split(" ")[0] or None
                              for t in task_ids])

    def flushall(self) -> None:
        """Redis restarted without its data: every queued and claimed id is forgotten."""
        self.seq = 0
        self.queued.clear()
        self.state_of.clear()


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
    assert nodes.started == [] and queue.state_of["t0"] == "started elsewhere"


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
    assert queue.state_of["t0"] == "queued"
    clock.pump([0.1] * 60)
    assert queue.state_of["t0"] == "rejected" and dispatcher.rejected == 1
    assert nodes.started == []


def test_a_deposed_answer_stops_dispatching_until_the_queue_is_read_again(setup):
    clock, queue, nodes, _, dispatcher = setup
    nodes.refuse_as_deposed = True
    queue.enqueue("t0", record("t0"))
    clock.advance(0.1)
    assert len(dispatcher) == 0 and queue.state_of["t0"] == "queued"


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


# -- a new submit where it entered: start here first -----------------------------------------


class SlotAdmitter:
    """``Scheduler.admit`` with slots only: refuses when full, else claims and starts."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.started: list[str] = []

    async def admit(self, request: Any, task_id: str, claim: Any, *,
                    created_at: float | None = None) -> Task:
        if len(self.started) >= self.slots:
            raise CapacityError(429, "no_free_slots", "full", 1)
        task = Task(id=task_id, node_id="n1", command=request.command, args=[], cwd=None,
                    env={}, secret_env_keys=[], labels={}, timeout=60.0, idle_timeout=None,
                    retries=0, created_at=0.0)
        await claim(task)
        self.started.append(task_id)
        return task


def first(admission: ClusterAdmission, task_id: str, **fields: Any) -> Any:
    request = parse_task_request({"command": "true", **fields}, 3600)
    return defer.Deferred.fromCoroutine(admission.start_first(request, task_id))


def admission_of(queue: FakeQueue, slots: int) -> tuple[ClusterAdmission, SlotAdmitter]:
    admitter = SlotAdmitter(slots)
    return ClusterAdmission("n1", queue, admitter, parse=lambda f: f, peers=None,
                            token=lambda: None, observe_token=lambda t: True,
                            labels={"zone": "a"}), admitter


def test_a_new_submit_starts_where_it_entered_when_there_is_room_and_nothing_waits():
    queue = FakeQueue()
    admission, admitter = admission_of(queue, slots=1)
    started = first(admission, "t1")
    assert isinstance(started.result, Task) and admitter.started == ["t1"]
    assert queue.state_of["t1"] == "started n1"  # claimed: never started anywhere else
    # full here, nothing waits: the leader places it
    assert first(admission, "t2").result is First.PLACE and "t2" not in queue.state_of


def test_a_new_submit_queues_behind_waiting_tasks_even_with_room_here():
    queue = FakeQueue()
    queue.enqueue("t0", record("t0", priority=5))
    admission, admitter = admission_of(queue, slots=2)
    assert first(admission, "t1").result is First.QUEUE
    assert admitter.started == [] and "t1" not in queue.state_of
    admission_full, _ = admission_of(queue, slots=0)
    assert first(admission_full, "t2").result is First.QUEUE


def test_a_new_submit_with_labels_this_node_lacks_is_placed_by_the_leader():
    queue = FakeQueue()
    admission, _ = admission_of(queue, slots=1)
    assert first(admission, "t1", labels={"zone": "b"}).result is First.PLACE
    assert first(admission, "t2", labels={"zone": "a"}).result.id == "t2"


def test_a_known_id_is_never_started_first():
    queue = FakeQueue()
    queue.state_of["t1"] = "started n2"
    admission, admitter = admission_of(queue, slots=1)
    results: list[Any] = []
    first(admission, "t1").addBoth(results.append)
    assert results[0].check(AlreadyAdmitted) and admitter.started == []


# -- Redis unreachable, Redis losing its data ------------------------------------------------


class UnreachableRedis:
    def command(self, *command: Any) -> defer.Deferred[Any]:
        return defer.fail(ConnectError("No route to host"))


@pytest.mark.parametrize("call", [
    lambda b: b.enqueue("t", record("t")), lambda b: b.claim("t", "a"),
    lambda b: b.end_queued("t", "cancelled", "why", 1.0), lambda b: b.scan(0, 10),
    lambda b: b.where("t"), lambda b: b.position("t"), lambda b: b.hold_key("k", "t", 9),
    lambda b: b.release_key("k", "t"), lambda b: b.retire("t", record("t"), "why", 1.0),
    lambda b: b.states(["t"]),
])
def test_every_queue_operation_reports_an_unreachable_redis_as_queue_unavailable(call):
    failure = call(RedisQueueBackend(UnreachableRedis(), "c"))
    result: list[Any] = []
    failure.addErrback(result.append)
    assert result and result[0].check(QueueUnavailable), result
    assert "No route to host" in result[0].getErrorMessage()


class Locator:
    def __init__(self) -> None:
        self.holder: str | None = None
        self.silent: str | None = None
        self.asked: list[str] = []

    async def locate(self, task_id: str) -> str | None:
        self.asked.append(task_id)
        if self.silent is not None:
            raise LookupError(f"could not ask {self.silent}")
        return self.holder


class Lost:
    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []

    def ended_lost(self, record: dict[str, Any], reason: str) -> defer.Deferred[None]:
        self.ended.append((record["id"], reason))
        return defer.succeed(None)


@pytest.fixture
def watch():
    clock, queue, locator, lost = Clock(), FakeQueue(), Locator(), Lost()
    woken: list[bool] = []
    service = AdmittedWatch(clock, queue, locator, lost, wake=lambda: woken.append(True),
                            grace=2.0, interval=1.0)
    service.startService()
    yield clock, queue, locator, lost, service, woken
    service.stopService()


def admit(queue: FakeQueue, service: AdmittedWatch, task_id: str, **kw: Any) -> None:
    service.add(task_id, record(task_id, **kw))
    queue.enqueue(task_id, record(task_id, **kw))


def test_a_task_redis_lost_that_no_node_has_is_queued_again_once_after_the_grace(watch):
    clock, queue, locator, lost, service, woken = watch
    admit(queue, service, "t0")
    clock.advance(1)
    assert locator.asked == []  # still queued in Redis
    queue.flushall()
    clock.advance(1)
    clock.advance(1)
    assert locator.asked == []  # missing for less than the grace: not decided yet
    clock.advance(1)
    assert locator.asked == ["t0"] and queue.state_of["t0"] == "queued"
    assert service.requeued == 1 and woken and lost.ended == []
    queue.claim("t0", "b")
    clock.advance(1)
    assert "t0" not in service  # started: Redis says where, the watch lets go


def test_a_task_redis_lost_that_a_node_started_gets_its_claim_back_and_never_runs_again(watch):
    clock, queue, locator, lost, service, _ = watch
    admit(queue, service, "t0")
    queue.flushall()
    locator.holder = "b"
    for _ in range(4):
        clock.advance(1)
    assert queue.state_of["t0"] == "started b" and "t0" not in queue.queued
    assert service.requeued == 0 and "t0" not in service and lost.ended == []


def test_a_task_redis_lost_ends_lost_at_its_queue_timeout_while_a_node_cannot_be_asked(watch):
    clock, queue, locator, lost, service, _ = watch
    admit(queue, service, "t0", timeout=10.0)
    queue.flushall()
    locator.silent = "c"
    for _ in range(9):
        clock.advance(1)
    assert lost.ended == [] and "t0" in service  # maybe running on c: wait, never rerun
    assert service.record("t0") is not None
    clock.advance(1)
    clock.advance(1)
    assert lost.ended == [("t0", LOST_REASON)] and "t0" not in service
    assert "t0" not in queue.state_of and service.requeued == 0


class CountingQueue(FakeQueue):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[list[str]] = []

    def states(self, task_ids: list[str]) -> defer.Deferred[list[str | None]]:
        self.asked.append(list(task_ids))
        return super().states(task_ids)


def test_the_watch_asks_about_a_bounded_batch_per_round_in_turns():
    # Asking Redis about every queued task each second stalled nodes at a deep queue.
    clock, queue = Clock(), CountingQueue()
    service = AdmittedWatch(clock, queue, Locator(), Lost(), interval=1.0, batch=2)
    service.startService()
    for task_id in ("t0", "t1", "t2", "t3", "t4"):
        admit(queue, service, task_id)
    clock.advance(1)
    clock.advance(1)
    assert queue.asked == [["t0", "t1"], ["t2", "t3"]]
    queue.claim("t4", "b")
    queue.claim("t0", "b")
    clock.advance(1)
    clock.advance(1)
    assert queue.asked[2:] == [["t4", "t0"], ["t1", "t2"]]
    assert "t4" not in service and "t0" not in service and "t1" in service
    service.stopService()


def test_a_submit_answered_503_is_ended_if_redis_queued_it_after_all(watch):
    clock, queue, _, _, service, _ = watch
    admit(queue, service, "t0")
    service.withdraw("t0")
    assert service.record("t0") is None
    clock.advance(1)
    assert queue.state_of["t0"] == "rejected" and "t0" not in service


def test_a_new_term_reads_the_queue_afresh_after_redis_lost_its_data():
    clock, queue = Clock(), FakeQueue()
    nodes = Nodes(queue, {"a": 1})
    term = {"now": 1}
    dispatcher = ClusterDispatcher(clock, queue, is_leader=lambda: True,
                                   candidates=nodes.candidates, send=nodes.send,
                                   term=lambda: term["now"], interval=0.1)
    dispatcher.startService()
    for index in range(3):
        queue.enqueue(f"old{index}", record(f"old{index}"))
    clock.advance(0.1)
    nodes.finish_all()
    clock.advance(0.1)
    nodes.finish_all()
    clock.advance(0.1)
    assert nodes.started == ["old0", "old1", "old2"]
    queue.flushall()  # seq starts at 1 again, below what the dispatcher followed
    term["now"] = 2
    nodes.finish_all()
    queue.enqueue("new", record("new"))
    clock.advance(0.1)
    assert nodes.started[-1] == "new"
    dispatcher.stopService()


def test_a_dispatch_to_a_peer_waits_the_configured_peer_timeout():
    from oxide_cluster.forwarding import PeerReply

    asked: list[tuple[str, bytes, float | None]] = []

    class Peers:
        async def request(self, node_id: str, method: bytes, path: bytes,
                          body: bytes | None = None,
                          headers: dict[bytes, bytes] | None = None,
                          timeout: float | None = None) -> PeerReply:
            asked.append((node_id, path, timeout))
            return PeerReply(202, {}, b"{}")

    admission = ClusterAdmission("n1", FakeQueue(), SlotAdmitter(0), parse=lambda f: f,
                                 peers=Peers(), token=lambda: 3,
                                 observe_token=lambda t: True, peer_timeout=4.5)
    sent = admission.send("n2", record("t1"))
    assert sent.called and sent.result is Outcome.STARTED
    assert asked == [("n2", b"/internal/dispatch", 4.5)]

"""The scheduler with a Clock, a fake executor (slots only) and an in-memory store."""

from __future__ import annotations

import random

import attrs
import pytest
from twisted.internet import defer, task

from oxide_cluster.executor import CapacityError
from oxide_cluster.model import Task, TaskState, parse_task_request
from oxide_cluster.scheduler import FairQueue, LabelBook, Scheduler, Unschedulable


class MemoryStore:
    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}

    def put_task(self, task_: Task) -> defer.Deferred[None]:
        self.tasks[task_.id] = attrs.evolve(task_)
        return defer.succeed(None)

    def get_task(self, task_id: str) -> defer.Deferred[Task | None]:
        return defer.succeed(self.tasks.get(task_id))

    def queued_tasks(self, node_id: str) -> defer.Deferred[list[Task]]:
        queued = [t for t in self.tasks.values()
                  if t.node_id == node_id and t.state is TaskState.QUEUED]
        return defer.succeed(sorted(queued, key=lambda t: t.queue_seq or 0))

    def find_idempotent(self, key: str, since: float) -> defer.Deferred[Task | None]:
        found = [t for t in self.tasks.values()
                 if t.idempotency_key == key and t.created_at >= since]
        return defer.succeed(found[-1] if found else None)


class SlotExecutor:
    """Slots and nothing else: a started task runs until the test calls ``finish``."""

    node_id = "n1"

    def __init__(self, clock: task.Clock, slots: int, store: MemoryStore) -> None:
        self.clock = clock
        self.store = store
        self.slots = slots
        self.running: dict[str, Task] = {}
        self.started: list[str] = []
        self.state_listeners: list = []
        self.published: list[tuple[str, str]] = []
        self._waiters: dict[str, list[defer.Deferred[Task]]] = {}
        self._count = 0

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.running)

    def check_capacity(self, resources=None) -> None:
        if len(self.running) >= self.slots:
            raise CapacityError(429, "no_free_slots", "all slots are busy", 1)

    def new_task(self, request, *, task_id=None, attempt=1, retry_of=None) -> Task:
        self._count += 1
        return Task(id=task_id or f"{self._count:04d}-n1", node_id="n1",
                    command=request.command, args=list(request.args), cwd=None, env={},
                    secret_env_keys=sorted(request.secret_env), labels={}, timeout=60.0,
                    idle_timeout=None, retries=0, created_at=self.clock.seconds(),
                    priority=request.priority, group=request.group,
                    queue_timeout=request.queue_timeout)

    def start(self, task_: Task, secret_env) -> defer.Deferred[Task]:
        task_.state = TaskState.RUNNING
        task_.started_at = self.clock.seconds()
        self.running[task_.id] = task_
        self.started.append(task_.command)
        return self.store.put_task(task_).addCallback(lambda _: task_)

    def finish(self, command: str) -> None:
        task_ = next(t for t in self.running.values() if t.command == command)
        del self.running[task_.id]
        task_.state = TaskState.SUCCEEDED
        for waiter in self._waiters.pop(task_.id, []):
            waiter.callback(task_)
        for listener in list(self.state_listeners):
            listener(task_)

    def live_task(self, task_id: str) -> Task | None:
        return self.running.get(task_id)

    def when_finished(self, task_id: str) -> defer.Deferred[Task] | None:
        if task_id not in self.running:
            return None
        waiter: defer.Deferred[Task] = defer.Deferred()
        self._waiters.setdefault(task_id, []).append(waiter)
        return waiter

    def cancel(self, task_id: str, reason: str = "cancelled by request") -> bool:
        return False

    def publish_state(self, task_: Task) -> None:
        self.published.append((task_.id, task_.state.value))


@attrs.define
class Rig:
    clock: task.Clock
    store: MemoryStore
    executor: SlotExecutor
    scheduler: Scheduler

    def submit(self, command: str, **fields) -> Task:
        key = fields.pop("idempotency_key", None)
        request = parse_task_request({"command": command, **fields}, 3600)
        submitted = defer.Deferred.fromCoroutine(
            self.scheduler.submit(request, idempotency_key=key))
        return self._result(submitted)

    @staticmethod
    def _result(deferred: defer.Deferred) -> Task:
        results: list = []
        deferred.addBoth(results.append)
        assert results, "the submit did not finish at once"
        if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]


def make_rig(slots: int = 1, store: MemoryStore | None = None,
             labels: LabelBook | None = None) -> Rig:
    clock = task.Clock()
    clock.advance(1000)
    store = store or MemoryStore()
    executor = SlotExecutor(clock, slots, store)
    scheduler = Scheduler(clock, store, executor, default_queue_timeout=100.0, labels=labels)
    scheduler.startService()
    defer.Deferred.fromCoroutine(scheduler.recover())
    return Rig(clock, store, executor, scheduler)


def test_a_free_slot_starts_at_once_and_a_full_node_queues():
    rig = make_rig(slots=1)
    first = rig.submit("a")
    assert first.state is TaskState.RUNNING
    second = rig.submit("b")
    assert second.state is TaskState.QUEUED and rig.scheduler.position(second.id) == 1
    assert rig.store.tasks[second.id].state is TaskState.QUEUED  # durable before the answer
    assert rig.executor.started == ["a"]
    rig.executor.finish("a")
    assert rig.executor.started == ["a", "b"]
    assert second.state is TaskState.RUNNING and rig.scheduler.position(second.id) is None


def test_queue_false_refuses_with_429():
    rig = make_rig(slots=1)
    rig.submit("a")
    with pytest.raises(CapacityError) as refused:
        rig.submit("b", queue=False)
    assert refused.value.status == 429 and len(rig.scheduler) == 0


def test_higher_priority_starts_first():
    rig = make_rig(slots=1)
    rig.submit("busy")
    for command, priority in (("low", 0), ("high", 5), ("mid", 1), ("high2", 5)):
        rig.submit(command, priority=priority, group="g")
    assert [t.command for t in rig.scheduler.queued()] == ["high", "high2", "mid", "low"]
    for command in ("busy", "high", "high2", "mid"):
        rig.executor.finish(command)
    assert rig.executor.started == ["busy", "high", "high2", "mid", "low"]


def test_groups_take_turns_within_a_priority():
    rig = make_rig(slots=1)
    rig.submit("busy")
    big = [rig.submit(f"big{i}", group="big") for i in range(200)]
    small = rig.submit("small", group="small")
    # The small group's one task goes second, not 201st.
    assert rig.scheduler.position(small.id) == 2
    assert rig.scheduler.position(big[1].id) == 3
    rig.executor.finish("busy")
    rig.executor.finish("big0")
    assert rig.executor.started == ["busy", "big0", "small"]
    rig.executor.finish("small")
    assert rig.executor.started[-1] == "big1"


def test_positions_follow_the_order_pop_would_take():
    rig = make_rig(slots=1)
    rig.submit("busy")
    rng = random.Random(7)
    for i in range(120):
        rig.submit(f"t{i}", group=rng.choice("abcd"), priority=rng.choice((0, 0, 1, 2)))
    queued = rig.scheduler.queued()
    assert [rig.scheduler.position(t.id) for t in queued] == list(range(1, 121))
    expected = [t.command for t in queued]
    running = "busy"
    for _ in range(120):
        rig.executor.finish(running)
        running = rig.executor.started[-1]
    assert rig.executor.started[1:] == expected


def test_a_task_still_queued_after_its_queue_timeout_is_rejected():
    rig = make_rig(slots=1)
    rig.submit("busy")
    waiting = rig.submit("late", queue_timeout=30)
    ended = rig.scheduler.when_finished(waiting.id)
    rig.clock.advance(29)
    assert waiting.state is TaskState.QUEUED
    rig.clock.advance(1)
    assert waiting.state is TaskState.REJECTED
    assert "waited 30s in the queue" in waiting.reason
    assert rig.store.tasks[waiting.id].state is TaskState.REJECTED
    assert ended.result is waiting
    rig.executor.finish("busy")
    assert rig.executor.started == ["busy"]  # it never starts


def test_the_default_queue_timeout_comes_from_the_config():
    rig = make_rig(slots=1)
    rig.submit("busy")
    waiting = rig.submit("late")
    rig.clock.advance(99)
    assert waiting.state is TaskState.QUEUED
    rig.clock.advance(1)
    assert waiting.state is TaskState.REJECTED and "queue_timeout 100s" in waiting.reason


def test_cancel_of_a_queued_task_ends_it_and_it_never_starts():
    rig = make_rig(slots=1)
    rig.submit("busy")
    doomed = rig.submit("doomed")
    after = rig.submit("after")
    ended = rig.scheduler.when_finished(doomed.id)
    assert rig.scheduler.cancel(doomed.id)
    assert doomed.state is TaskState.CANCELLED and ended.result is doomed
    assert rig.scheduler.position(after.id) == 1
    assert (doomed.id, "cancelled") in rig.executor.published
    rig.executor.finish("busy")
    assert rig.executor.started == ["busy", "after"]


def test_a_timed_out_waiter_is_forgotten():
    rig = make_rig(slots=1)
    rig.submit("busy")
    queued = rig.submit("q")
    waiter = rig.scheduler.when_finished(queued.id)
    waiter.addTimeout(5, rig.clock)
    waiter.addErrback(lambda f: f.trap(defer.TimeoutError))
    rig.clock.advance(5)
    assert rig.scheduler._waiters.count(queued.id) == 0


def test_a_waiter_on_a_queued_task_fires_when_it_ends_after_starting():
    rig = make_rig(slots=1)
    rig.submit("busy")
    queued = rig.submit("q")
    ended: list = []
    rig.scheduler.when_finished(queued.id).addCallback(ended.append)
    rig.executor.finish("busy")  # the queued task starts
    assert rig.executor.started == ["busy", "q"] and ended == []
    rig.executor.finish("q")
    assert [task.id for task in ended] == [queued.id]


def test_the_same_idempotency_key_returns_the_same_task_and_runs_once():
    rig = make_rig(slots=1)
    first = rig.submit("a", idempotency_key="k1")
    again = rig.submit("a", idempotency_key="k1")
    assert again.id == first.id and rig.executor.started == ["a"]
    queued = rig.submit("b", idempotency_key="k2")
    assert rig.submit("b", idempotency_key="k2").id == queued.id and len(rig.scheduler) == 1
    rig.clock.advance(24 * 3600 + 1)  # kept 24 h, then a new submit is a new task
    assert rig.submit("a", idempotency_key="k1").id != first.id


def test_an_idempotency_key_is_found_in_the_store_after_a_restart():
    store = MemoryStore()
    first = make_rig(slots=1, store=store).submit("a", idempotency_key="k1")
    rig = make_rig(slots=1, store=store)
    assert rig.submit("a", idempotency_key="k1").id == first.id
    assert rig.executor.started == []


def test_queued_tasks_come_back_after_a_restart_in_order():
    store = MemoryStore()
    before = make_rig(slots=1, store=store)
    before.submit("busy")
    before.submit("one", group="g")
    before.submit("two", group="g")
    before.submit("secret", group="g", secret_env={"TOKEN": "x"})
    before.scheduler.stopService()

    after = make_rig(slots=1, store=store)
    assert after.executor.started == ["one"]
    assert [t.command for t in after.scheduler.queued()] == ["two"]
    secret = next(t for t in store.tasks.values() if t.command == "secret")
    assert secret.state is TaskState.REJECTED and "secret_env" in secret.reason
    after.executor.finish("one")
    assert after.executor.started == ["one", "two"]


def test_a_task_whose_queue_timeout_passed_while_the_agent_was_down_is_rejected():
    store = MemoryStore()
    before = make_rig(slots=1, store=store)
    before.submit("busy")
    late = before.submit("late", queue_timeout=10)
    before.scheduler.stopService()
    clock = task.Clock()
    clock.advance(2000)
    executor = SlotExecutor(clock, 1, store)
    scheduler = Scheduler(clock, store, executor, default_queue_timeout=100.0)
    scheduler.startService()
    defer.Deferred.fromCoroutine(scheduler.recover())
    assert executor.started == [] and store.tasks[late.id].state is TaskState.REJECTED


def test_labels_no_known_node_has_are_unschedulable():
    peers = [{"gpu": "yes", "zone": "a"}]
    book = LabelBook({"os": "linux"}, lambda: peers)
    book.membership_event({"type": "node", "event": "pruned",
                           "node": {"node_id": "gone", "labels": {"arch": "arm64"}}})
    rig = make_rig(labels=book)
    for ok in ({}, {"os": "linux"}, {"gpu": "yes"}, {"gpu": "yes", "zone": "a"},
               {"arch": "arm64"}):
        rig.scheduler.check_schedulable(ok)
    with pytest.raises(Unschedulable, match="gpu=yes, os=linux"):
        rig.scheduler.check_schedulable({"gpu": "yes", "os": "linux"})
    with pytest.raises(Unschedulable, match="tpu=v5"):
        rig.scheduler.check_schedulable({"tpu": "v5"})


def test_fair_queue_pop_matches_ordered_under_random_pushes_and_removes():
    rng = random.Random(3)
    queue = FairQueue()
    live: list[str] = []
    for seq in range(2000):
        if live and rng.random() < 0.3:
            victim = live.pop(rng.randrange(len(live)))
            assert queue.remove(victim)
        else:
            task_id = f"t{seq}"
            queue.push(task_id, rng.choice((0, 1, 2)), rng.choice("abcde"), seq)
            live.append(task_id)
        if seq % 97 == 0:
            order = list(queue.ordered())
            assert sorted(order) == sorted(live)
            probe = rng.choice(order) if order else None
            if probe is not None:
                assert queue.position(probe) == order.index(probe) + 1
    order = list(queue.ordered())
    popped = []
    while (task_id := queue.pop()) is not None:
        popped.append(task_id)
    assert popped == order and len(queue) == 0


def test_a_draining_node_refuses_new_work_starts_nothing_queued_and_resumes():
    rig = make_rig(slots=1)
    running = rig.submit("a")
    queued = rig.submit("b")
    rig.scheduler.drain()
    assert rig.scheduler.drain_state.draining and rig.scheduler.drain_state.since == 1000
    with pytest.raises(CapacityError) as refused:
        rig.submit("c")
    assert (refused.value.status, refused.value.code) == (503, "draining")
    assert refused.value.retry_after > 0
    rig.executor.finish("a")  # the running task finishes; the queued one waits
    assert running.state is TaskState.SUCCEEDED
    assert rig.executor.started == ["a"] and queued.state is TaskState.QUEUED
    rig.scheduler.resume()
    assert not rig.scheduler.drain_state.draining
    assert rig.executor.started == ["a", "b"] and queued.state is TaskState.RUNNING
    assert rig.submit("c", queue=True).state is TaskState.QUEUED  # taken again


def test_a_repeat_of_an_earlier_submit_is_answered_while_draining():
    rig = make_rig(slots=1)
    first = rig.submit("a", idempotency_key="k")
    rig.scheduler.drain()
    assert rig.submit("a", idempotency_key="k").id == first.id


def test_a_task_whose_claim_is_on_its_way_is_found_and_forgotten_if_refused():
    # Redis names this node as soon as the claim lands: a GET forwarded here before the
    # claim's reply must find the task, not answer 404.
    rig = make_rig(slots=2)
    request = parse_task_request({"command": "a"}, 3600)
    claims: list[defer.Deferred[None]] = []

    def claim(_: Task) -> defer.Deferred[None]:
        claims.append(defer.Deferred())
        return claims[-1]

    first = defer.Deferred.fromCoroutine(rig.scheduler.admit(request, "t1-n2", claim))
    assert rig.scheduler.live_task("t1-n2") is not None
    claims[0].callback(None)
    assert rig.executor.started == ["a"]
    assert rig.scheduler.live_task("t1-n2") is rig.executor.running["t1-n2"]
    second = defer.Deferred.fromCoroutine(rig.scheduler.admit(request, "t2-n2", claim))
    assert rig.scheduler.live_task("t2-n2") is not None
    claims[1].errback(RuntimeError("claimed elsewhere"))
    second.addErrback(lambda failure: failure.trap(RuntimeError))
    assert rig.scheduler.live_task("t2-n2") is None and rig.executor.started == ["a"]
    assert first.called

"""Declared resources in scheduling: allocatable room, placement by fit, queueing until a
task fits, and the 422 for a task no node could ever fit."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.internet import defer, task

from oxide_cluster import config
from oxide_cluster.capacity import Allocatable, Capacity, host_allocatable, misfit
from oxide_cluster.cgroups import Resources
from oxide_cluster.cluster_queue import ClusterDispatcher
from oxide_cluster.executor import CapacityError
from oxide_cluster.model import TaskState, parse_task_request
from oxide_cluster.placement import Candidate, rank
from oxide_cluster.scheduler import LabelBook, Scheduler, Unschedulable
from tests.unit.test_cluster_queue import FakeQueue, Nodes, record
from tests.unit.test_executor import Harness
from tests.unit.test_scheduler import MemoryStore as QueueStore

GIB = 2 ** 30


class Store(QueueStore):
    """What both the scheduler and the real executor ask of the store."""

    def append_output(self, task_id: str, offset: int, stream: str,
                      data: bytes) -> defer.Deferred[None]:
        return defer.succeed(None)

    def mark_unfinished_lost(self, node_id: str, reason: str,
                             now: float) -> defer.Deferred[list[Any]]:
        return defer.succeed([])


class Node(Harness):
    """A real executor (4 CPUs, 8 GiB allocatable, 8 slots) under a real scheduler."""

    def __init__(self, labels: LabelBook | None = None, **options: Any) -> None:
        options.setdefault("allocatable", Allocatable(4.0, 8 * GIB))
        options.setdefault("max_tasks", 8)
        super().__init__(**options)
        self.store = Store()
        self.executor._store = self.store
        self.scheduler = Scheduler(self.clock, self.store, self.executor,
                                   default_queue_timeout=100.0, labels=labels,
                                   default_resources=options.get("default_resources",
                                                                 Resources()))
        self.scheduler.startService()
        defer.Deferred.fromCoroutine(self.scheduler.recover())

    def run(self, command: str, **resources: Any) -> Any:
        body: dict[str, Any] = {"command": "sh", "args": ["-c", command]}
        if resources:
            body["resources"] = resources
        request = parse_task_request(body, 3600)
        return defer.Deferred.fromCoroutine(self.scheduler.submit(request))

    def end(self, index: int) -> None:
        self.processes[index].exit(0)


def test_running_tasks_take_what_they_declare_from_the_allocatable_room():
    node = Node(default_resources=Resources(memory=GIB))
    assert node.executor.capacity() == Capacity(Allocatable(4.0, 8 * GIB), 4.0, 8 * GIB)
    node.run("a", cpus=1.5, memory="2G")
    node.run("b")  # declares nothing: takes the default 1 GiB and no CPUs
    assert node.executor.capacity() == Capacity(Allocatable(4.0, 8 * GIB), 2.5, 5 * GIB)
    assert node.executor.capacity().to_stats() == {
        "allocatable_cpus": 4.0, "allocatable_memory": 8 * GIB, "free_cpus": 2.5,
        "free_memory": 5 * GIB}
    node.end(0)
    assert node.executor.capacity().free_cpus == 4.0


def test_a_task_that_does_not_fit_what_is_free_waits_and_starts_once_room_frees():
    node = Node()
    node.run("big", cpus=3)
    second: list[Any] = []
    node.run("second", cpus=2).addBoth(second.append)
    assert second[0].state is TaskState.QUEUED
    # a small task behind it fits and starts; the waiting one keeps its place
    small: list[Any] = []
    node.run("small", cpus=0.5).addBoth(small.append)
    assert small[0].state is TaskState.RUNNING and len(node.processes) == 2
    with pytest.raises(CapacityError) as refused:
        node.executor.check_capacity(Resources(cpus=2))
    assert refused.value.code == "no_free_resources" and refused.value.status == 429
    assert "0.5 of 4 allocatable CPUs are free" in refused.value.message
    node.end(0)  # the 3-CPU task ends: the 2-CPU one fits now
    assert len(node.processes) == 3 and node.store.tasks[second[0].id].state \
        is TaskState.RUNNING
    assert node.executor.capacity().free_cpus == pytest.approx(1.5)


def test_a_queue_run_without_the_free_resources_is_refused_429_when_it_may_not_wait():
    node = Node()
    node.run("big", memory="7G")
    request = parse_task_request({"command": "x", "resources": {"memory": "2G"},
                                  "queue": False}, 3600)
    failures: list[Any] = []
    defer.Deferred.fromCoroutine(node.scheduler.submit(request)).addErrback(failures.append)
    assert failures[0].value.code == "no_free_resources"
    assert "1024 of 8192 MiB allocatable memory are free" in failures[0].value.message


def test_a_task_no_node_could_ever_fit_is_unschedulable_naming_the_resource():
    peers = [({"gpu": "yes"}, Allocatable(16.0, 64 * GIB)), ({"os": "old"}, None)]
    book = LabelBook({"os": "linux"}, lambda: [labels for labels, _ in peers],
                     local_allocatable=Allocatable(4.0, 8 * GIB), rooms=lambda: peers)
    node = Node(labels=book, default_resources=Resources(memory=GIB))
    schedulable = node.scheduler.check_schedulable
    schedulable({}, Resources(cpus=16))  # the gpu node has 16
    schedulable({"os": "linux"}, Resources(cpus=4, memory=8 * GIB))
    schedulable({"os": "old"}, Resources(cpus=1000))  # announced no room: may fit
    schedulable({}, Resources(cpus=17))  # the old node may have the room
    with pytest.raises(Unschedulable, match=r"resources\.cpus") as error:
        schedulable({"gpu": "yes"}, Resources(cpus=17))
    assert error.value.resource == "cpus" and "the most is 16 CPUs" in str(error.value)
    with pytest.raises(Unschedulable, match=r"resources\.memory") as error:
        schedulable({"os": "linux"}, Resources(memory=9 * GIB))
    assert "9 GiB of memory" in str(error.value) and "os=linux" in str(error.value)
    with pytest.raises(Unschedulable, match=r"resources\.memory"):
        # the node's default_resources fill what the task leaves out
        book_small = LabelBook({}, local_allocatable=Allocatable(4.0, GIB // 2))
        Node(labels=book_small, default_resources=Resources(memory=GIB)) \
            .scheduler.check_schedulable({}, None)


def test_a_pruned_peer_keeps_counting_for_the_422_with_the_room_it_announced():
    book = LabelBook({}, local_allocatable=Allocatable(2.0, 4 * GIB))
    stats = Capacity(Allocatable(32.0, 128 * GIB), 0.0, 0).to_stats()
    book.membership_event({"type": "node", "event": "pruned",
                           "node": {"node_id": "big", "labels": {}, "stats": stats}})
    assert book.unfit({}, Resources(cpus=30)) is None
    assert book.unfit({}, Resources(cpus=33)) is not None


def test_placement_leaves_out_nodes_without_room_and_unknown_room_fits():
    def node(name: str, free_cpus: float | None) -> Candidate:
        capacity = None if free_cpus is None else \
            Capacity(Allocatable(8.0, 8 * GIB), free_cpus, 8 * GIB)
        return Candidate(name, 4, 10.0, 10.0, {}, capacity=capacity)

    nodes = [node("small", 1.0), node("roomy", 6.0), node("old", None)]
    assert {c.node_id for c in rank(nodes, {}, Resources(cpus=2))} == {"old", "roomy"}
    assert len(rank(nodes, {})) == 3
    after = node("roomy", 6.0).minus(Resources(cpus=5, memory=GIB))
    assert after.free_slots == 3 and after.capacity is not None
    assert after.capacity.free_cpus == 1.0 and after.capacity.free_memory == 7 * GIB
    assert not after.fits(Resources(cpus=2))


class RoomyNodes(Nodes):
    """Cluster nodes with slots and declared CPUs."""

    def __init__(self, queue: FakeQueue, slots: dict[str, int],
                 cpus: dict[str, float]) -> None:
        super().__init__(queue, slots)
        self.cpus = cpus
        self.declared: dict[str, float] = {}

    def candidates(self) -> list[Candidate]:
        return [attrs.evolve(c, capacity=Capacity(
            Allocatable(self.cpus[c.node_id], 8 * GIB),
            self.cpus[c.node_id] - sum(self.declared.get(t, 0.0)
                                       for t in self.running[c.node_id]), 8 * GIB))
            for c in super().candidates()]


def test_the_cluster_queue_packs_by_declared_cpus_and_keeps_what_fits_nowhere_yet():
    clock = task.Clock()
    queue = FakeQueue()
    nodes = RoomyNodes(queue, {"a": 4, "b": 4}, {"a": 2.0, "b": 4.0})
    placed: list[tuple[str, Resources]] = []
    dispatcher = ClusterDispatcher(clock, queue, is_leader=lambda: True,
                                   candidates=nodes.candidates, send=nodes.send,
                                   placed=lambda node_id, r: placed.append((node_id, r)),
                                   default_queue_timeout=60, interval=0.1)
    dispatcher.startService()
    try:
        for name, cpus in (("three", 3), ("two", 2), ("another", 2)):
            nodes.declared[name] = cpus
            queued = record(name)
            queued["request"]["resources"] = {"cpus": cpus}
            queue.enqueue(name, queued)
        clock.advance(0.1)
        # "three" fits only b; "two" then fits a; "another" fits nowhere until one ends
        assert nodes.running == {"a": ["two"], "b": ["three"]}
        assert ("b", Resources(cpus=3.0)) in placed
        nodes.running["b"].clear()
        clock.advance(0.1)
        assert nodes.running["b"] == ["another"]
    finally:
        dispatcher.stopService()


def test_reserve_is_kept_from_the_host_and_parsed_from_every_source():
    host = host_allocatable(Resources())
    kept = host_allocatable(Resources(cpus=0.5, memory=256 * 2**20))
    assert kept.cpus == host.cpus - 0.5 and kept.memory == host.memory - 256 * 2**20
    loaded = config.load({}, {"OXIDE_RESERVE": "cpus=0.5,memory=512M"})
    assert loaded.reserve == Resources(cpus=0.5, memory=512 * 2**20)
    with pytest.raises(config.ConfigError, match=r"reserve\.pids"):
        config.load({}, {"OXIDE_RESERVE": "pids=10"})
    assert misfit(Resources(cpus=1.0), 1.0, 0) is None

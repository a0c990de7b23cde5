"""TaskRouter with a Clock, the real scheduler over a fake executor, and fake peers: where a
task goes, and that a task sent to a node that may have received it never runs twice."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet import defer

from oxide_cluster.api import TaskApi
from oxide_cluster.cluster_queue import ClusterAdmission, ClusterQueue
from oxide_cluster.forwarding import PeerReply, PeerUnavailable
from oxide_cluster.model import RequestError, parse_task_request
from oxide_cluster.routing import (
    Admitted,
    Queued,
    Refused,
    Relayed,
    RouterSettings,
    RunBody,
    TaskRouter,
    parse_place,
    parse_run,
)
from tests.unit.test_cluster_queue import FakeQueue
from tests.unit.test_scheduler import Rig, make_rig


@attrs.define
class FakeElector:
    is_leader: bool = True
    token: int = 7
    highest_token: int = 7
    leader_id: str | None = "n1"

    def leader(self) -> dict[str, Any]:
        return {"node_id": self.leader_id}

    def observe_token(self, token: int) -> bool:
        if token < self.highest_token:
            return False
        self.highest_token = token
        return True


class FakePeers:
    """Each peer answers from ``replies``: a PeerReply, or a PeerUnavailable raised."""

    def __init__(self, replies: dict[str, PeerReply | PeerUnavailable]) -> None:
        self.replies = replies
        self.sent: list[tuple[str, bytes, dict[str, Any]]] = []

    def knows(self, node_id: str) -> bool:
        return node_id in self.replies

    async def request(self, node_id: str, method: bytes, path: bytes, body: bytes | None = None,
                      headers: dict[bytes, bytes] | None = None,
                      timeout: float | None = None) -> PeerReply:
        self.sent.append((node_id, path, json.loads(body or b"null")))
        reply = self.replies[node_id]
        if isinstance(reply, PeerUnavailable):
            raise reply
        return reply


@attrs.define
class FakePlacer:
    order: list[str]
    placed_on: list[str] = attrs.Factory(list)

    def choose(self, labels: Any, exclude: Any = (), resources: Any = None) -> list[str]:
        return [node_id for node_id in self.order if node_id not in exclude]

    def placed(self, node_id: str) -> None:
        self.placed_on.append(node_id)


def accepted(task_id: str = "t-c") -> PeerReply:
    return PeerReply(202, {}, json.dumps({"id": task_id, "state": "running"}).encode())


def router(rig: Rig, peers: FakePeers, order: list[str],
           elector: FakeElector | None = None) -> TaskRouter:
    return TaskRouter(RouterSettings("n1", {}, 3600.0, 100.0), rig.clock,
                      elector or FakeElector(), rig.scheduler, rig.executor, peers=peers,
                      placement=FakePlacer(order))


def submit(target: TaskRouter, command: str = "x") -> defer.Deferred[Any]:
    request = parse_task_request({"command": command}, 3600)
    return defer.Deferred.fromCoroutine(target.submit(request, {"command": command}, None,
                                                      None))


def refusal(deferred: defer.Deferred[Any]) -> Refused:
    failures: list[Any] = []
    deferred.addErrback(failures.append)
    assert failures, "the call did not fail"
    error = failures[0].value
    assert isinstance(error, Refused), failures[0]
    return error


def result(deferred: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results and not hasattr(results[0], "raiseException"), results
    return results[0]


def test_a_node_that_may_have_received_the_task_ends_the_placement() -> None:
    """b timed out after the send: the task may be running there. Trying c (or here)
    could run it twice; the client gets 503 with the id the task got before the send."""
    rig = make_rig(slots=2)
    peers = FakePeers({"b": PeerUnavailable("node b did not answer: timeout", sent=True),
                       "c": accepted()})
    error = refusal(submit(router(rig, peers, ["b", "c", "n1"])))
    assert error.status == 503 and error.code == "placement_unknown"
    [(node_id, path, body)] = peers.sent
    assert (node_id, path) == ("b", b"/internal/run")
    assert body["task_id"].endswith("-b") and body["task_id"] in error.message
    assert body["token"] == 7
    assert rig.executor.started == []  # nor here


def test_a_node_never_reached_is_skipped_for_the_next() -> None:
    rig = make_rig(slots=2)
    peers = FakePeers({"b": PeerUnavailable("connection refused", sent=False),
                       "c": accepted()})
    placer = FakePlacer(["b", "c", "n1"])
    target = TaskRouter(RouterSettings("n1", {}, 3600.0, 100.0), rig.clock, FakeElector(),
                        rig.scheduler, rig.executor, peers=peers, placement=placer)
    routed = result(submit(target))
    assert isinstance(routed, Relayed) and routed.reply.status == 202
    assert [node_id for node_id, _, _ in peers.sent] == ["b", "c"]
    assert placer.placed_on == ["c"] and rig.executor.started == []


def test_a_busy_node_is_skipped_and_this_node_runs_it() -> None:
    rig = make_rig(slots=1)
    peers = FakePeers({"b": PeerReply(429, {}, b"{}")})
    routed = result(submit(router(rig, peers, ["b", "n1"])))
    assert isinstance(routed, Admitted) and rig.executor.started == ["x"]


def test_a_leader_that_took_the_task_but_did_not_answer_is_not_second_guessed() -> None:
    """A follower's forward to the leader timed out: the leader may have placed it."""
    rig = make_rig(slots=2)
    elector = FakeElector(is_leader=False, leader_id="lead")
    peers = FakePeers({"lead": PeerUnavailable("node lead did not answer", sent=True)})
    error = refusal(submit(router(rig, peers, [], elector)))
    assert error.status == 503 and error.code == "leader_unreachable"
    assert [path for _, path, _ in peers.sent] == [b"/internal/place"]
    assert rig.executor.started == []


def test_a_leader_never_reached_leaves_the_task_to_this_node() -> None:
    rig = make_rig(slots=2)
    elector = FakeElector(is_leader=False, leader_id="lead")
    peers = FakePeers({"lead": PeerUnavailable("connection refused", sent=False)})
    routed = result(submit(router(rig, peers, [], elector)))
    assert isinstance(routed, Admitted) and rig.executor.started == ["x"]


def test_a_repeated_delivery_of_an_id_is_refused_not_run_again() -> None:
    rig = make_rig(slots=2)
    target = router(rig, FakePeers({}), [])
    run = RunBody({"command": "x"}, token=7, task_id="0001abc-n1")
    first = result(defer.Deferred.fromCoroutine(target.run(run)))
    assert isinstance(first, Admitted) and first.task.id == "0001abc-n1"
    again = refusal(defer.Deferred.fromCoroutine(target.run(run)))
    assert again.status == 409 and again.code == "already_admitted"
    assert rig.executor.started == ["x"]


def test_a_deposed_leaders_placement_is_refused() -> None:
    rig = make_rig(slots=2)
    target = router(rig, FakePeers({}), [], FakeElector(highest_token=9))
    stale = refusal(defer.Deferred.fromCoroutine(
        target.run(RunBody({"command": "x"}, token=8))))
    assert stale.status == 409 and stale.code == "stale_leader_token"
    assert rig.executor.started == []


def test_a_retry_runs_as_a_new_attempt_never_on_the_node_it_left() -> None:
    rig = make_rig(slots=2)
    peers = FakePeers({"b": PeerReply(202, {}, b'{"id": "r-b"}')})
    target = router(rig, peers, ["dead", "b", "n1"])
    record = {"id": "t-dead", "node_id": "dead", "command": "x", "args": [], "cwd": None,
              "env": {}, "timeout": 60, "idle_timeout": None, "labels": {}, "retries": 1,
              "attempt": 1}
    answer = result(defer.Deferred.fromCoroutine(target.place_retry(record)))
    assert answer == {"id": "r-b"}
    [(node_id, path, body)] = peers.sent
    assert (node_id, path) == ("b", b"/internal/run")
    assert body["retry_of"] == "t-dead" and body["attempt"] == 2
    assert body["task"]["retries"] == 0


@pytest.mark.parametrize(("body", "field"), [
    ([], "body"),
    ({"version": 2, "task": {}}, "version"),
    ({"version": 1}, "task"),
    ({"version": 1, "task": {}, "hop": "run"}, "hop"),
    ({"version": 1, "task": {}, "token": "7"}, "token"),
    ({"version": 1, "task": {}, "attempt": 0}, "attempt"),
    ({"version": 1, "task": {}, "wait": 301}, "wait"),
])
def test_run_bodies_are_refused_naming_the_field(body: Any, field: str) -> None:
    with pytest.raises(RequestError) as raised:
        parse_run(body)
    assert raised.value.field == field


def test_wire_bodies_round_trip() -> None:
    run = RunBody({"command": "x"}, 3, "t-b", 2, "t-a", "key", 5.0)
    assert parse_run(run.to_json()) == run
    place = parse_place({"version": 1, "task": {"command": "x"}, "task_id": "t-n1"})
    assert place.task_id == "t-n1" and place.wait is None
    with pytest.raises(RequestError):
        parse_place({"version": 1, "task": {}, "retry_of": "t"})


@pytest.mark.parametrize("header", ["X-Oxide-Forwarded", "X-Oxide-Leader-Token",
                                    "X-Oxide-Retry-Of", "X-Oxide-Attempt", "X-Oxide-Task-Id"])
def test_the_public_route_refuses_the_internal_headers_by_name(header: str) -> None:
    node = SimpleNamespace(secret="s", executor=SimpleNamespace(state_listeners=[]),
                           config=SimpleNamespace(max_timeout=600.0, max_body=65536))
    client = StubTreq(TaskApi(node).resource())  # type: ignore[arg-type]
    replies: list[Any] = []
    client.post("http://node/execute", json={"command": "true"},
                headers={"X-Cluster-Secret": "s", header: "run"}).addBoth(replies.append)
    client.flush()
    bodies: list[Any] = []
    replies[0].content().addBoth(bodies.append)
    client.flush()
    error = json.loads(bodies[0])["error"]
    assert replies[0].code == 400 and error["code"] == "internal_header"
    assert header in error["message"] and "internal" in error["message"]


# -- a Redis cluster (the queue's semantics in memory: tests/unit/test_cluster_queue.py) --


class FakeWatch:
    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    def add(self, task_id: str, record: dict[str, Any]) -> None:
        self.records[task_id] = record

    def withdraw(self, task_id: str) -> None:
        self.records.pop(task_id, None)

    def record(self, task_id: str) -> dict[str, Any] | None:
        return self.records.get(task_id)


class FakeDispatcher:
    woken = 0

    def wake(self) -> None:
        self.woken += 1


def cluster_router(rig: Rig, peers: FakePeers, elector: FakeElector,
                   queue: FakeQueue) -> TaskRouter:
    admission = ClusterAdmission(
        "n1", queue, rig.scheduler, parse=lambda fields: parse_task_request(fields, 3600),
        peers=peers, token=lambda: elector.token, observe_token=elector.observe_token)
    cluster = ClusterQueue(queue, admission, FakeDispatcher(), FakeWatch(), None)
    return TaskRouter(RouterSettings("n1", {}, 3600.0, 100.0), rig.clock, elector,
                      rig.scheduler, rig.executor, peers=peers, placement=FakePlacer([]),
                      cluster=cluster)


def test_a_follower_that_lost_the_leaders_reply_queues_the_same_id_and_it_runs_once() -> None:
    """The stalled-leader case: the leader got the task (and will start it, claiming its
    id) but its reply is lost. The follower queues the task under the id it gave at entry,
    so whichever start comes second finds the id claimed: one run. (The follower is full,
    so the task is not started where it entered: the leader places it.)"""
    rig = make_rig(slots=0)
    elector = FakeElector(is_leader=False, leader_id="lead")
    peers = FakePeers({"lead": PeerUnavailable("node lead did not answer", sent=True)})
    queue = FakeQueue()
    routed = result(submit(cluster_router(rig, peers, elector, queue)))
    [(_, path, sent)] = peers.sent
    assert path == b"/internal/place" and sent["task_id"]
    assert isinstance(routed, Queued) and routed.task.id == sent["task_id"]
    assert queue.state_of[sent["task_id"]] == "queued" and rig.executor.started == []
    # The resumed leader starts it: its claim wins; a dispatch of the queued copy loses.
    assert result(queue.claim(sent["task_id"], "lead")) is None
    assert result(queue.claim(sent["task_id"], "n1")) == "started lead"


def test_the_cluster_task_listing_waits_the_configured_peer_timeout_for_each_peer() -> None:
    """``/tasks?scope=cluster`` asks every healthy peer with ``peer_timeout``, not a
    fixed wait; a peer that does not answer is listed as unreachable."""
    from oxide_cluster.membership import Membership
    from tests.unit.test_node import announce

    rig = make_rig()
    membership = Membership(rig.clock)
    for node_id, ip in (("b", "10.0.0.2"), ("c", "10.0.0.3")):
        membership.announce_received(node_id, announce(node_id, None), (ip, 4001))
    asked: list[tuple[str, float | None]] = []

    class TimedPeers(FakePeers):
        async def request(self, node_id: str, method: bytes, path: bytes,
                          body: bytes | None = None,
                          headers: dict[bytes, bytes] | None = None,
                          timeout: float | None = None) -> PeerReply:
            asked.append((node_id, timeout))
            if node_id == "c":
                raise PeerUnavailable("node c did not answer: timeout", sent=True)
            return PeerReply(200, {}, json.dumps({"tasks": [{"id": "t-b"}]}).encode())

    target = TaskRouter(RouterSettings("n1", {}, 3600.0, 100.0, peer_timeout=42.5), rig.clock,
                        FakeElector(), rig.scheduler, rig.executor, peers=TimedPeers({}),
                        membership=membership)
    page = result(defer.Deferred.fromCoroutine(target.peer_tasks(b"/tasks?limit=5")))
    assert sorted(asked) == [("b", 42.5), ("c", 42.5)]
    assert page.tasks == [{"id": "t-b"}] and page.unreachable == ["c"]

"""Queueing across a Redis cluster: real twistd nodes on loopback and a real redis-server.

Each task appends its id to a marker file when it starts, so a second run of any task
shows up as a repeated line.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.test_node import task_processes
from tests.support import AgentProcess, loopback_cluster, poll_until, start_meshed, stop_all

TERMINAL = {"succeeded", "failed", "cancelled", "timed_out", "lost", "rejected"}


@pytest.fixture
def make_cluster(tmp_path, redis, request):
    made: list[AgentProcess] = []
    submitted: list[str] = []

    def make(count: int) -> list[AgentProcess]:
        nodes = loopback_cluster(tmp_path, count, ("--redis", redis.url, "--max-tasks", "1"))
        made.extend(nodes)
        start_meshed(nodes)
        poll_until(lambda: any(n.get("/api/cluster/leader").json()["node_id"] == node_id(n)
                               for n in nodes), timeout=20, message="a node that leads")
        return nodes

    yield make, submitted
    report = getattr(request.node, "rep_call", None)
    stop_all(made, report is not None and report.failed)
    for task_id in submitted:
        for process in task_processes(task_id):
            process.kill()


def node_id(node: AgentProcess) -> str:
    return node.get("/health").json()["node_id"]


def leader_of(nodes: list[AgentProcess]) -> AgentProcess:
    leader = nodes[0].get("/api/cluster/leader").json()["node_id"]
    return next(node for node in nodes if node_id(node) == leader)


def marked_task(marks: Path, seconds: float = 1) -> dict:
    script = f'echo "$OXIDE_TASK_ID" >> {marks}; sleep {seconds}'
    return {"command": "sh", "args": ["-c", script]}


def submit_all(node: AgentProcess, body: dict, count: int) -> list:
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: node.post("/execute", body), range(count)))


def final_state(nodes: list[AgentProcess], task_id: str) -> dict | None:
    for node in nodes:
        try:
            task = node.get(f"/task/{task_id}", timeout=5).json()
        except OSError:
            continue
        if task.get("state") in TERMINAL:
            return task
    return None


def test_six_tasks_via_a_follower_on_two_one_slot_nodes_queue_and_each_runs_once(
        make_cluster, tmp_path):
    make, submitted = make_cluster
    nodes = make(2)
    follower = next(node for node in nodes if node is not leader_of(nodes))
    marks = tmp_path / "marks"
    replies = submit_all(follower, marked_task(marks), 6)
    assert [reply.status for reply in replies] == [202] * 6, replies
    ids = [reply.json()["id"] for reply in replies]
    submitted.extend(ids)
    assert len(set(ids)) == 6
    assert sum(reply.json()["state"] == "queued" for reply in replies) >= 4
    ends = {task_id: poll_until(lambda t=task_id: final_state(nodes, t), timeout=60,
                                message=f"task {task_id} to end") for task_id in ids}
    assert {task["state"] for task in ends.values()} == {"succeeded"}, ends
    ran = Counter(marks.read_text().split())
    assert ran == Counter(ids)  # each exactly once
    assert {task["node_id"] for task in ends.values()} == {node_id(n) for n in nodes}


def test_leader_killed_while_tasks_are_queued_every_queued_task_runs_once(
        make_cluster, tmp_path):
    make, submitted = make_cluster
    nodes = make(3)
    leader = leader_of(nodes)
    follower = next(node for node in nodes if node is not leader)
    marks = tmp_path / "marks"
    replies = submit_all(follower, marked_task(marks, 2), 9)
    assert [reply.status for reply in replies] == [202] * 9, replies
    ids = [reply.json()["id"] for reply in replies]
    submitted.extend(ids)
    queued = [task_id for task_id in ids
              if follower.get(f"/task/{task_id}").json()["state"] == "queued"]
    assert len(queued) >= 4
    leader.kill()
    survivors = [node for node in nodes if node is not leader]
    poll_until(lambda: leader_of(survivors), timeout=20, message="a new leader")
    ends = {task_id: poll_until(lambda t=task_id: final_state(survivors, t), timeout=90,
                                message=f"task {task_id} to end") for task_id in ids}
    ran = Counter(marks.read_text().split())
    assert max(ran.values()) == 1, ran  # no task ran twice
    for task_id in queued:
        # Queued when the leader died: it still runs, once, on a surviving node.
        assert ends[task_id]["state"] == "succeeded", ends[task_id]
        assert ran[task_id] == 1
    others = {ends[t]["state"] for t in ids if t not in queued}
    assert others <= {"succeeded", "lost"}, ends


def test_idempotency_key_on_two_nodes_names_one_task(make_cluster, tmp_path):
    make, submitted = make_cluster
    first, second = make(2)
    marks = tmp_path / "marks"
    body = marked_task(marks, 0)
    one = first.post("/execute", body, headers={"Idempotency-Key": "ci-job-42"})
    two = second.post("/execute", body, headers={"Idempotency-Key": "ci-job-42"})
    assert one.status in (200, 202) and two.status in (200, 202), (one, two)
    submitted.append(one.json()["id"])
    assert one.json()["id"] == two.json()["id"]
    poll_until(lambda: final_state([first, second], one.json()["id"]), timeout=30,
               message="the task to end")
    other = second.post("/execute", body, headers={"Idempotency-Key": "ci-job-43"})
    assert other.json()["id"] != one.json()["id"]
    poll_until(lambda: final_state([first, second], other.json()["id"]), timeout=30,
               message="the other task to end")
    assert Counter(marks.read_text().split()) == Counter([one.json()["id"],
                                                         other.json()["id"]])


def test_get_queue_on_any_node_lists_the_cluster_queue_in_dispatch_order(
        make_cluster, tmp_path):
    make, submitted = make_cluster
    nodes = make(2)
    follower = next(node for node in nodes if node is not leader_of(nodes))
    release = tmp_path / "release"
    blocker = {"command": "sh", "args": ["-c", f"while [ ! -e {release} ]; do sleep 0.05; done"]}
    blockers = [node.post("/execute", blocker).json()["id"] for node in nodes]
    submitted.extend(blockers)
    poll_until(lambda: all(final_state(nodes, t) is None and any(
        n.get(f"/task/{t}").json()["state"] == "running" for n in nodes) for t in blockers),
        timeout=20, message="both one-slot nodes to run a blocker")
    queued = {}
    for name, priority, group in (("a1", 0, "a"), ("a2", 0, "a"), ("b1", 5, "b"),
                                  ("c1", 0, "c")):
        body = {"command": "true", "priority": priority, "group": group}
        reply = follower.post("/execute", body)
        assert reply.status == 202 and reply.json()["state"] == "queued", reply
        queued[name] = reply.json()["id"]
    submitted.extend(queued.values())
    # Priority first, then the groups take turns, FIFO within a group.
    order = [queued[name] for name in ("b1", "a1", "c1", "a2")]
    try:
        for node in nodes:  # the leader and the follower answer alike, from Redis
            listing = node.get("/queue").json()
            assert [task["id"] for task in listing["tasks"]] == order, listing
            assert [task["queue_position"] for task in listing["tasks"]] == [1, 2, 3, 4]
            assert [task["group"] for task in listing["tasks"]] == ["b", "a", "c", "a"]
            assert {task["state"] for task in listing["tasks"]} == {"queued"}
            assert listing["queued"] == 4
            assert listing["by_priority"] == {"5": 1, "0": 3}
        limited = follower.get("/queue?limit=2").json()
        assert [task["id"] for task in limited["tasks"]] == order[:2]
        assert limited["queued"] == 4
    finally:
        release.touch()
    for task_id in [*blockers, *order]:
        assert poll_until(lambda t=task_id: final_state(nodes, t), timeout=30,
                          message=f"task {task_id} to end")["state"] == "succeeded"
    assert follower.get("/queue").json() == {"queued": 0, "by_priority": {}, "tasks": []}


def test_a_key_whose_submit_was_refused_takes_the_next_submit(make_cluster, tmp_path):
    """A refusal that took nothing (429 with ``queue: false``, given by the entering node
    or relayed from the leader) frees the key: the CI job that submits again with it gets
    a task that runs, not the id of one that never will."""
    make, submitted = make_cluster
    nodes = make(2)
    release = tmp_path / "release"
    for node in nodes:  # every slot taken
        held = node.post("/execute", {"command": "sh", "node": node_id(node), "args": [
            "-c", f"while [ ! -e {release} ]; do sleep 0.05; done"]})
        assert held.status == 202 and held.json()["state"] == "running", held
        submitted.append(held.json()["id"])
    body = {"command": "true", "queue": False}
    for index, node in enumerate(nodes):
        refused = node.post("/execute", body, headers={"Idempotency-Key": f"ci-job-{index}"})
        assert refused.status == 429, refused
    release.touch()
    for task_id in submitted[:2]:
        poll_until(lambda task_id=task_id: final_state(nodes, task_id), timeout=30,
                   message="the blockers to end")
    for index, node in enumerate(nodes):
        key = {"Idempotency-Key": f"ci-job-{index}"}
        again = node.post("/execute?wait=20", body, headers=key)
        assert again.status == 200 and again.json()["state"] == "succeeded", again
        submitted.append(again.json()["id"])
        same = node.post("/execute", body, headers=key)  # the key now names that task
        assert same.json()["id"] == again.json()["id"]


def test_a_pinned_task_whose_node_did_not_answer_is_retired_and_never_runs(
        meshed, redis, tmp_path):
    """The pinned node is SIGSTOPped: the entering node's forward times out after
    ``peer_timeout``, retires the id in Redis (it can never be claimed) and answers 503
    ``node_unreachable``, which took nothing: the key is free, the id stays ``rejected``,
    and the stopped node, resumed, does not run it."""
    entry, pinned = meshed(2, ("--redis", redis.url, "--peer-timeout", "1"), leader=True)
    marks = tmp_path / "marks"
    body = {**marked_task(marks, 0), "node": node_id(pinned)}
    key = {"Idempotency-Key": "ci-job-pinned"}
    os.kill(pinned.pid, signal.SIGSTOP)
    try:
        refused = entry.post("/execute", body, headers=key, timeout=30)
    finally:
        os.kill(pinned.pid, signal.SIGCONT)
    assert refused.status == 503, refused
    assert refused.json()["error"]["code"] == "node_unreachable", refused
    retired = re.search(r"task (\S+)\)$", refused.json()["error"]["message"])
    assert retired is not None, refused
    pinned_id = node_id(pinned)
    poll_until(lambda: any(n["node_id"] == pinned_id and n["healthy"] for n in
                           entry.get("/api/cluster/nodes").json()["remote_nodes"]), 20,
               message="the resumed node to be heard again")
    again = entry.post("/execute?wait=20", body, headers=key)
    assert again.status == 200 and again.json()["state"] == "succeeded", again
    assert again.json()["id"] != retired.group(1)
    gone = entry.get(f"/task/{retired.group(1)}").json()
    assert gone["state"] == "rejected" and "did not answer" in gone["reason"], gone
    assert marks.read_text().split() == [again.json()["id"]]  # the retired id never ran

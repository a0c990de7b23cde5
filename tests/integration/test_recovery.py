"""A node dies mid-task: the leader marks its tasks lost and retries them elsewhere.

Three real agents on loopback with static peers and a real ``redis-server``.
"""

from __future__ import annotations

import time

import pytest

from tests.integration.test_node import task_processes
from tests.support import loopback_cluster, poll_until, start_meshed, stop_all


@pytest.fixture
def cluster(tmp_path, redis, request):
    nodes = loopback_cluster(tmp_path, 3, ("--redis", redis.url))
    started_tasks: list[str] = []
    try:
        start_meshed(nodes)
        # A node that holds the lease reports itself leader only once it really leads.
        poll_until(lambda: any(n.get("/api/cluster/leader").json()["node_id"] == node_id(n)
                               for n in nodes), timeout=20, message="a node that leads")
        yield nodes, started_tasks
    finally:
        report = getattr(request.node, "rep_call", None)
        stop_all(nodes, report is not None and report.failed)
        for task_id in started_tasks:  # orphans of the killed agent
            for process in task_processes(task_id):
                process.kill()


def node_id(node):
    return node.get("/health").json()["node_id"]


def test_node_death_mid_task_marks_it_lost_and_the_retry_completes(cluster):
    nodes, started_tasks = cluster
    leader_id = nodes[0].get("/api/cluster/leader").json()["node_id"]
    victim = next(node for node in nodes if node_id(node) != leader_id)
    victim_id = node_id(victim)
    survivor = next(node for node in nodes if node is not victim)
    script = f'if [ "$OXIDE_NODE_ID" = "{victim_id}" ]; then sleep 300; fi; echo finished'
    task = survivor.post("/execute", {"command": "sh", "args": ["-c", script],
                                      "node": victim_id, "retries": 1}).json()
    started_tasks.append(task["id"])
    assert task["state"] == "running" and task["node_id"] == victim_id
    victim.kill()
    killed_at = time.monotonic()
    lost = poll_until(lambda: (lambda t: t if t["state"] == "lost" else None)(
        survivor.get(f"/task/{task['id']}").json()), timeout=15, message="task lost")
    print(f"\nlost everywhere {time.monotonic() - killed_at:.2f}s after kill -9")
    assert victim_id in lost["reason"] and "died" in lost["reason"]
    for node in nodes:
        if node is not victim:
            assert node.get(f"/task/{task['id']}").json()["state"] == "lost"

    def retry_finished():
        for node in nodes:
            if node is victim:
                continue
            for candidate in node.get("/tasks").json()["tasks"]:
                if candidate["retry_of"] == task["id"] and candidate["state"] == "succeeded":
                    return candidate
        return None
    retry = poll_until(retry_finished, timeout=15, message="the retry to finish elsewhere")
    assert retry["attempt"] == 2 and retry["node_id"] != victim_id
    output = survivor.get(f"/task/{retry['id']}/output").body
    assert output == b"finished\n"


def test_task_with_secret_env_is_lost_but_not_retried(cluster):
    nodes, started_tasks = cluster
    leader_id = nodes[0].get("/api/cluster/leader").json()["node_id"]
    victim = next(node for node in nodes if node_id(node) != leader_id)
    survivor = next(node for node in nodes if node is not victim)
    task = survivor.post("/execute", {"command": "sleep", "args": ["300"], "retries": 2,
                                      "node": node_id(victim),
                                      "secret_env": {"TOKEN": "x"}}).json()
    started_tasks.append(task["id"])
    victim.kill()
    lost = poll_until(lambda: (lambda t: t if t["state"] == "lost" else None)(
        survivor.get(f"/task/{task['id']}").json()), timeout=15, message="task lost")
    assert "not retried" in lost["reason"]
    assert "TOKEN" not in str(lost) and "env" not in lost

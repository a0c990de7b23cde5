"""The queue of a standalone node, against a real ``twistd -n oxide-cluster``."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

from tests.support import REPO_ROOT, SECRET, poll_until


def cli_run(agent, *command: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OXIDE_")}
    env.update(OXIDE_NODE=agent.url, OXIDE_CLUSTER_SECRET=SECRET, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-m", "oxide_cluster.cli", "run", "--", *command],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_eight_cli_runs_on_a_two_slot_node_all_succeed(agent_factory, tmp_path):
    node = agent_factory(extra_args=("--max-tasks", "2"))
    marks = tmp_path / "marks"
    runs = [cli_run(node, "sh", "-c", f"sleep 0.5; echo run{i} >> {marks}; echo done{i}")
            for i in range(8)]
    results = [(run.wait(60), run.stdout.read(), run.stderr.read()) for run in runs]
    for i, (code, out, err) in enumerate(results):
        assert code == 0, (i, code, err)
        assert out == f"done{i}\n".encode(), (i, out, err)
    assert sorted(marks.read_text().split()) == sorted(f"run{i}" for i in range(8))
    tasks = node.get("/tasks?limit=20").json()["tasks"]
    assert len(tasks) == 8 and {t["state"] for t in tasks} == {"succeeded"}


def test_concurrent_http_submits_queue_and_report_positions(agent_factory):
    node = agent_factory(extra_args=("--max-tasks", "2"))
    body = {"command": "sleep", "args": ["30"]}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: node.post("/execute", {**body, "group": f"g{i % 2}"}),
                                range(8)))
    assert sorted(reply.status for reply in replies) == [202] * 8
    states = sorted(reply.json()["state"] for reply in replies)
    assert states == ["queued"] * 6 + ["running"] * 2
    queue = node.get("/queue").json()
    assert queue["queued"] == 6 and queue["by_priority"] == {"0": 6}
    assert [t["queue_position"] for t in queue["tasks"]] == [1, 2, 3, 4, 5, 6]
    # Two groups of three take turns.
    assert [t["group"] for t in queue["tasks"]][:2] in (["g0", "g1"], ["g1", "g0"])
    first = queue["tasks"][0]
    assert node.get(f"/task/{first['id']}").json()["queue_position"] == 1
    cancelled = node.post(f"/task/{first['id']}/cancel")
    assert cancelled.status == 200 and cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["queue_position"] is None
    now = node.get("/queue").json()
    assert now["queued"] == 5 and first["id"] not in {t["id"] for t in now["tasks"]}
    head = now["tasks"][0]
    running = [r.json()["id"] for r in replies if r.json()["state"] == "running"]
    node.post(f"/task/{running[0]}/cancel?wait=10")
    started = poll_until(lambda: node.get(f"/task/{head['id']}").json()["state"] == "running",
                         message="the head of the queue to start")
    assert started
    assert node.get(f"/task/{first['id']}").json()["started_at"] is None  # never ran
    assert "oxide_queue_depth{priority=\"0\"} 4.0" in node.get("/metrics").body.decode()


def test_queue_false_gives_429_and_a_queue_timeout_rejects(agent_factory):
    node = agent_factory(extra_args=("--max-tasks", "1"))
    assert node.post("/execute", {"command": "sleep", "args": ["30"]}).status == 202
    refused = node.post("/execute", {"command": "true", "queue": False})
    assert refused.status == 429 and refused.json()["error"]["code"] == "no_free_slots"
    waited = node.post("/execute?wait=20", {"command": "true", "queue_timeout": 0.5})
    assert waited.status == 200, waited
    task = waited.json()
    assert task["state"] == "rejected" and "waited" in task["reason"] \
        and "in the queue" in task["reason"]


def test_idempotency_key_returns_the_same_task_and_runs_once(agent, tmp_path):
    marks = tmp_path / "marks"
    body = {"command": "sh", "args": ["-c", f"echo x >> {marks}"]}
    headers = {"Idempotency-Key": "ci-job-42-step-3"}
    first = agent.post("/execute?wait=10", body, headers=headers)
    again = agent.post("/execute?wait=10", body, headers=headers)
    assert first.status == again.status == 200
    assert again.json()["id"] == first.json()["id"]
    other = agent.post("/execute?wait=10", body, headers={"Idempotency-Key": "another"})
    assert other.json()["id"] != first.json()["id"]
    assert marks.read_text() == "x\nx\n"  # two keys, two runs; never three
    agent.stop()
    agent.start()
    after = agent.post("/execute?wait=10", body, headers=headers)
    assert after.json()["id"] == first.json()["id"] and marks.read_text() == "x\nx\n"


def test_unknown_labels_are_unschedulable(agent):
    reply = agent.post("/execute", {"command": "true", "labels": {"gpu": "h100"}})
    assert reply.status == 422
    error = reply.json()["error"]
    assert error["code"] == "unschedulable" and "gpu=h100" in error["message"]


def test_queued_tasks_survive_an_agent_restart_and_run_after_it(agent_factory, tmp_path):
    node = agent_factory(extra_args=("--max-tasks", "1"))
    blocker = node.post("/execute", {"command": "sleep", "args": ["300"]}).json()
    marks = tmp_path / "marks"
    queued = [node.post("/execute", {"command": "sh", "args": ["-c", f"echo q{i} >> {marks}"],
                                     "priority": i}).json() for i in range(3)]
    assert [task["state"] for task in queued] == ["queued"] * 3
    assert node.stop(timeout=20) in (0, -15)
    assert not marks.exists()  # nothing ran while queued
    node.start()
    assert node.get(f"/task/{blocker['id']}").json()["state"] == "cancelled"
    for task in queued:
        ended = node.get(f"/task/{task['id']}?wait=20").json()
        assert ended["state"] == "succeeded", ended
    # Each ran once, highest priority first.
    assert marks.read_text().split() == ["q2", "q1", "q0"]

"""Drain on a real ``twistd -n oxide-cluster``: running work finishes, new work is refused."""

from __future__ import annotations

import signal

from tests.integration.test_cli import cli, finished
from tests.support import AgentProcess, poll_until

# Runs until the test creates the file ``go`` in the task's working directory.
WAIT_FOR_GO = ["-c", "while [ ! -e \"$1\" ]; do sleep 0.05; done; echo done", "sh"]


def test_drain_lets_running_work_finish_refuses_new_work_and_resume_restores(agent,
                                                                             tmp_path):
    go = tmp_path / "go"
    reply = agent.post("/execute", {"command": "sh", "args": [*WAIT_FOR_GO, str(go)]})
    assert reply.status == 202, reply
    running = reply.json()
    assert running["state"] == "running"

    drained = agent.post("/node/drain")
    assert drained.status == 200, drained
    assert drained.json()["draining"] is True and drained.json()["running"] == 1
    assert drained.json()["since"] is not None
    assert agent.post("/node/drain").json()["draining"] is True  # idempotent

    refused = agent.post("/execute", {"command": "true"})
    assert refused.status == 503, refused
    assert refused.json()["error"]["code"] == "draining"
    assert int(refused.headers["Retry-After"]) > 0
    ready = agent.get("/ready")
    assert ready.status == 503 and ready.json()["draining"] is True
    assert ready.json()["checks"]["not_draining"] is False
    assert agent.get("/stats").json()["draining"] is True

    go.touch()  # the running task was not touched by the drain: it finishes normally
    ended = agent.get(f"/task/{running['id']}?wait=20").json()
    assert ended["state"] == "succeeded", ended
    assert agent.get(f"/task/{running['id']}/output").body == b"done\n"

    resumed = agent.post("/node/resume")
    assert resumed.status == 200 and resumed.json() == {
        "draining": False, "since": None, "deadline": None, "running": 0, "queued": 0}
    assert agent.get("/ready").status == 200
    assert agent.run_task("true")["state"] == "succeeded"


def test_a_node_started_with_drain_is_not_ready_until_resumed(tmp_path):
    node = AgentProcess(tmp_path / "drained", extra_args=("--drain", "true"))
    try:
        node.start(wait=False)
        ready = poll_until(lambda: _replied(node, "/ready"), 20, message="/ready to answer")
        assert ready.status == 503 and ready.json()["draining"] is True
        assert node.post("/execute", {"command": "true"}).json()["error"]["code"] == "draining"
        assert node.post("/node/resume").status == 200
        node.wait_ready()
        assert node.run_task("true")["state"] == "succeeded"
    except BaseException:
        print(node.log_text())
        raise
    finally:
        node.terminate()


def _replied(node: AgentProcess, path: str):
    """The reply once the node is up and draining is the only check failing."""
    reply = node.get(path)
    checks = reply.json()["checks"]
    starting = any(not ok for name, ok in checks.items() if name != "not_draining")
    return None if starting else reply


def test_cli_drain_with_a_deadline_cancels_what_still_runs_and_resume_takes_work(agent,
                                                                               tmp_path):
    running = agent.post("/execute", {"command": "sh",
                                      "args": [*WAIT_FOR_GO, str(tmp_path / "never")]}).json()
    code, out, err = finished(cli(agent.url, "node", "drain", "--deadline", "1"))
    assert code == 0, err
    assert out.startswith(b"draining since ") and b"cancelled at" in out, out
    assert b"1 running, 0 queued" in out
    ended = agent.get(f"/task/{running['id']}?wait=20").json()
    assert ended["state"] == "cancelled" and "drain deadline" in ended["reason"], ended
    assert agent.get("/stats").json()["draining"] is True  # still draining after it
    code, out, err = finished(cli(agent.url, "node", "resume"))
    assert code == 0 and out == b"not draining: 0 running, 0 queued\n", (out, err)
    assert agent.run_task("true")["state"] == "succeeded"


def test_a_stop_drains_first_and_running_work_finishes_within_the_grace(agent_factory,
                                                                        tmp_path):
    go = tmp_path / "go"
    node = agent_factory(extra_args=("--stop-grace", "30"))
    running = node.post("/execute", {"command": "sh", "args": [*WAIT_FOR_GO, str(go)]}).json()
    assert running["state"] == "running"
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    # The API still answers while the task finishes: draining, and new work refused.
    ready = poll_until(lambda: (r := node.get("/ready")).status == 503 and r, 10,
                       message="the stopping node to drain")
    assert ready.json()["draining"] is True
    assert node.post("/execute", {"command": "true"}).json()["error"]["code"] == "draining"
    assert node.process.poll() is None
    go.touch()
    assert node.process.wait(20) in (0, -signal.SIGTERM)  # twistd ends as signalled
    node.start()  # the store says how it ended
    ended = node.get(f"/task/{running['id']}").json()
    assert ended["state"] == "succeeded", ended
    assert "running tasks have up to 30.0s to finish" in node.log_text()


def test_peers_see_a_draining_node_and_the_leader_places_around_it(meshed):
    first, second = meshed(2, ("--max-tasks", "1"))
    second_id = second.get("/health").json()["node_id"]
    assert second.post("/node/drain").status == 200

    def seen_draining() -> bool:
        nodes = first.get("/api/cluster/nodes").json()["remote_nodes"]
        return any(n["node_id"] == second_id and n["stats"].get("draining") for n in nodes)
    poll_until(seen_draining, 10, message="the peer's drain in membership")
    placed = [first.post("/execute?wait=10", {"command": "true", "queue": False})
              for _ in range(3)]
    for reply in placed:
        if reply.status in (200, 202):
            assert reply.json()["node_id"] != second_id, reply.json()

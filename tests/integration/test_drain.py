"""Drain on a real ``twistd -n oxide-cluster``: running work finishes, new work is refused."""

from __future__ import annotations

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
        "draining": False, "since": None, "running": 0, "queued": 0}
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

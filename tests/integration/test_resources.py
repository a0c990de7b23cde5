"""Declared resources in scheduling, through a real ``twistd -n oxide-cluster``."""

from __future__ import annotations

from tests.support import poll_until

# Runs until the test creates the file given as $1.
WAIT_FOR_GO = ["-c", "while [ ! -e \"$1\" ]; do sleep 0.05; done", "sh"]


def test_a_task_no_node_could_fit_is_422_and_one_that_does_not_fit_now_waits(agent_factory,
                                                                           tmp_path):
    agent = agent_factory(extra_args=("--cgroups", "off", "--reserve", "memory=64M"))
    stats = agent.get("/stats").json()
    cpus, memory = stats["allocatable_cpus"], stats["allocatable_memory"]
    assert stats["free_cpus"] == cpus and cpus >= 1 and memory > 0
    too_big = agent.post("/execute", {"command": "true", "resources": {"cpus": cpus + 1}})
    assert too_big.status == 422, too_big
    error = too_big.json()["error"]
    assert error["code"] == "unschedulable" and "resources.cpus" in error["message"]
    too_much = agent.post("/execute", {"command": "true",
                                       "resources": {"memory": memory + 2 ** 30}})
    assert too_much.status == 422 and "resources.memory" in too_much.json()["error"]["message"]

    go = tmp_path / "go"
    whole = agent.post("/execute", {"command": "sh", "args": [*WAIT_FOR_GO, str(go)],
                                    "resources": {"cpus": cpus}}).json()
    assert whole["state"] == "running", whole
    assert agent.get("/stats").json()["free_cpus"] == 0
    waiting = agent.post("/execute", {"command": "true", "resources": {"cpus": 1}}).json()
    assert waiting["state"] == "queued", waiting
    refused = agent.post("/execute", {"command": "true", "resources": {"cpus": 1},
                                      "queue": False})
    assert refused.status == 429 and refused.json()["error"]["code"] == "no_free_resources"
    plain = agent.run_task("true")  # declares nothing: a slot is enough
    assert plain["state"] == "succeeded", plain
    go.touch()
    ended = agent.get(f"/task/{waiting['id']}?wait=20").json()
    assert ended["state"] == "succeeded", ended
    poll_until(lambda: agent.get("/stats").json()["free_cpus"] == cpus,
               message="the declared CPUs to be free again")

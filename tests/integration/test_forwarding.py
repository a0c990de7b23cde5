"""Three real agents on loopback (static peers): any node answers for any task."""

from __future__ import annotations

import pytest

from tests.support import AgentProcess, poll_until


@pytest.fixture
def trio(meshed):
    return meshed(3, ("--max-tasks", "2"))

def node_id(node):
    return node.get("/health").json()["node_id"]


def test_pinned_task_runs_on_b_and_any_node_follows_and_cancels(trio):
    a, b, c = trio
    b_id = node_id(b)
    reply = a.post("/execute", {"command": "sh", "node": b_id,
                                "args": ["-c", "echo one; sleep 300"]})
    assert reply.status == 202, reply
    task = reply.json()
    assert task["node_id"] == b_id and task["id"].endswith(b_id)
    seen_from_c = c.get(f"/task/{task['id']}").json()
    assert seen_from_c["state"] == "running" and seen_from_c["node_id"] == b_id
    output = c.get(f"/task/{task['id']}/output?wait=10")
    assert output.body == b"one\n" and output.headers["X-Task-State"] == "running"
    cancelled = a.post(f"/task/{task['id']}/cancel?wait=10")
    assert cancelled.status == 200 and cancelled.json()["state"] == "cancelled"
    assert b.get(f"/task/{task['id']}").json()["state"] == "cancelled"


def test_output_long_poll_returns_when_output_arrives(trio):
    a, b, _ = trio
    task = b.post("/execute", {"command": "sh", "node": node_id(b),
                               "args": ["-c", "sleep 0.5; echo late"]}).json()
    reply = a.get(f"/task/{task['id']}/output?offset=0&wait=20")
    assert reply.body == b"late\n"
    assert reply.headers["X-Next-Offset"] == "5"


def test_busy_node_gets_no_new_tasks(trio):
    a, _, _ = trio
    a_id = node_id(a)
    for _ in range(2):  # fill both of a's slots
        assert a.post("/execute", {"command": "sleep", "args": ["300"], "node": a_id}).status == 202
    poll_until(lambda: all(peer["stats"]["free_slots"] == 0 for peer in
                           trio[1].get("/api/cluster/nodes").json()["remote_nodes"]
                           if peer["node_id"] == a_id), message="a's load to be announced")
    placed = [a.post("/execute?wait=10", {"command": "true"}).json() for _ in range(4)]
    assert all(task["state"] == "succeeded" for task in placed), placed
    assert a_id not in {task["node_id"] for task in placed}


def test_unknown_node_pin_is_a_clear_error(trio):
    reply = trio[0].post("/execute", {"command": "true", "node": "no-such-node"})
    assert reply.status == 503
    assert "no-such-node" in reply.json()["error"]["message"]


def test_labels_steer_placement(tmp_path):
    nodes = [AgentProcess(tmp_path / f"l{i}", discovery=True) for i in range(2)]
    nodes[0].extra_args = ("--peers", f"127.0.0.1:{nodes[1].discovery_port}")
    nodes[1].extra_args = ("--peers", f"127.0.0.1:{nodes[0].discovery_port}",
                           "--labels", "gpu=yes")
    try:
        for node in nodes:
            node.start()
        poll_until(lambda: nodes[0].get("/api/cluster/nodes").json()["healthy_nodes"] == 2,
                   message="both nodes")
        gpu_id = node_id(nodes[1])
        for _ in range(3):
            reply = nodes[0].post("/execute?wait=10",
                                  {"command": "true", "labels": {"gpu": "yes"}})
            assert reply.status == 200, reply
            assert reply.json()["node_id"] == gpu_id
        refused = nodes[0].post("/execute", {"command": "true", "labels": {"tpu": "yes"}})
        # No node has ever advertised tpu=yes: refused at once, not queued or retried.
        assert refused.status == 422 and "tpu=yes" in refused.json()["error"]["message"]
        assert refused.json()["error"]["code"] == "unschedulable"
    finally:
        for node in nodes:
            node.terminate()


def test_websocket_attach_on_a_node_that_does_not_own_the_task(trio, tmp_path):
    from oxide_cluster.client import Node, decode_output
    from tests.support import SECRET

    a, b, c = trio
    go = tmp_path / "go"
    script = ('for i in $(seq 1 200); do echo "line $i"; done; echo err >&2; '
              'while [ ! -e "$1" ]; do sleep 0.05; done; echo after; exit 4')
    task = a.post("/execute", {"command": "sh", "node": node_id(b),
                               "args": ["-c", script, "sh", str(go)]}).json()
    poll_until(lambda: b.get(f"/task/{task['id']}").json()["output_bytes"] > 1000,
               message="the first part of the output")
    ws = Node(c.url, SECRET).websocket(timeout=30)
    ws.send_json({"op": "attach", "task": task["id"]})
    data, kinds = b"", []
    for message in ws.messages():
        kinds.append(message["type"])
        if message["type"] == "output":
            assert message["offset"] == len(data)
            data += decode_output(message)
        elif message["type"] == "live":
            go.touch()
        elif message["type"] == "state":
            break
        elif message["type"] == "error":
            raise AssertionError(message)
    ws.close()
    expected = b"".join(f"line {i}\n".encode() for i in range(1, 201)) + b"err\nafter\n"
    assert data == expected
    assert kinds[0] == "attached" and kinds[-1] == "state"
    assert message["exit_code"] == 4 and message["state"] == "failed"
    assert data == b.get(f"/task/{task['id']}/output").body


def test_tasks_scope_cluster_lists_every_nodes_tasks(trio):
    a, _, c = trio
    ids = set()
    for node in trio:
        task = a.post("/execute?wait=10", {"command": "true", "node": node_id(node)}).json()
        ids.add(task["id"])
    local = {t["id"] for t in a.get("/tasks").json()["tasks"]}
    assert len(local & ids) == 1
    cluster = c.get("/tasks?scope=cluster&limit=50").json()
    assert ids <= {t["id"] for t in cluster["tasks"]}
    assert cluster["unreachable"] == []
    listed = [t["id"] for t in cluster["tasks"]]
    assert listed == sorted(listed, reverse=True)
    page = c.get("/tasks?scope=cluster&limit=2").json()
    assert len(page["tasks"]) == 2 and page["next_cursor"] == page["tasks"][-1]["id"]

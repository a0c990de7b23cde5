"""Issue 14 between real hosts: a workspace uploaded to one node runs on another, and a
retry after its node's death finds its workspace (blobs fetched node to node).

One agent per network namespace; the client (this process) talks to one node only.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import oxide
import pytest
from harness import poll_until
from oxide import OxideNode

from oxide_cluster.client import Node
from oxide_cluster.workspace_client import BATCH_BLOB_MAX, upload_workspace
from tests.integration.test_node import task_processes

# Every file's sha256, as the task sees its tree (and as this process sees the original).
LISTING = "find . -type f | LC_ALL=C sort | xargs sha256sum"


def make_tree(root: Path) -> None:
    for index in range(120):
        directory = root / f"d{index % 6}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{index}.txt").write_bytes(f"file {index}\n".encode() * (index + 1))
    (root / "big.bin").write_bytes(os.urandom(BATCH_BLOB_MAX + 4096))  # sent by PUT
    (root / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(root / "run.sh", 0o755)


def expected_listing(root: Path) -> bytes:
    return subprocess.run(["sh", "-c", LISTING], cwd=root, check=True,
                          capture_output=True).stdout


def client(node: OxideNode) -> Node:
    return Node(node.agent.base_url, node.secret, timeout=60)


def submit(node: OxideNode, body: dict[str, Any]) -> dict[str, Any]:
    status, reply, _ = node.agent.post("/execute", body, timeout=30)
    assert status in (200, 202), (node, status, reply)
    return dict(reply)


def task_of(node: OxideNode, task_id: str) -> dict[str, Any]:
    status, body, _ = node.agent.get(f"/task/{task_id}")
    assert status == 200, (node, status, body)
    return dict(body)


def blobs_on(node: OxideNode) -> int:
    return sum(1 for path in (node.state_dir / "cas").glob("??/*"))


def test_a_workspace_sent_to_a_runs_on_c_with_the_full_tree(cluster, tmp_path):
    c = cluster(3)
    a, _, third = c.nodes
    tree = tmp_path / "tree"
    make_tree(tree)
    sent = upload_workspace(client(a), tree)
    assert blobs_on(third) == 0
    task = submit(a, {"command": "sh", "args": ["-c", f"pwd; ./run.sh; {LISTING}"],
                      "workspace": sent.digest, "node": third.node_id})
    assert task["node_id"] == third.node_id, task
    done = poll_until(lambda: (lambda t: t if t["state"] not in ("queued", "running")
                               else None)(task_of(a, task["id"])), 30,
                      message="the task to end on C")
    assert done["state"] == "succeeded", done
    status, output, _ = a.agent.get(f"/task/{task['id']}/output")
    assert status == 200
    lines = output.split(b"\n", 2)
    assert lines[0].decode() == str(third.state_dir / "workspaces" / task["id"])
    assert lines[1] == b"ran"
    assert lines[2] == expected_listing(tree)
    assert blobs_on(third) >= sent.files + 1  # fetched from A, node to node


TTL = 2.0


@pytest.fixture
def redis_cluster(network: Callable[[int], harness.Network], redis_server: Any,
                  tmp_path: Path) -> Callable[..., oxide.Cluster]:
    def make(n_hosts: int, extra_args: tuple[str, ...] = ()) -> oxide.Cluster:
        net = network(n_hosts)
        redis = redis_server(net)
        c = oxide.Cluster(net, tmp_path / f"{net.log_dir.name}-agents",
                          ("--redis", redis.url, "--leader-ttl", str(TTL), *extra_args))
        c.start(net.hosts)
        c.wait_meshed()
        return c
    return make


def leader_of(nodes: list[OxideNode]) -> OxideNode:
    def agreed() -> OxideNode | None:
        views = {n.get_json("/api/cluster/leader")["node_id"] for n in nodes}
        if len(views) != 1:
            return None
        leader_id = views.pop()
        return next((n for n in nodes if n.node_id == leader_id), None)
    found: OxideNode = poll_until(agreed, 15, interval=0.05, message="one agreed leader")
    return found


def test_a_retry_after_its_node_died_finds_its_workspace(redis_cluster, tmp_path):
    c = redis_cluster(3, ("--max-tasks", "1"))
    leader = leader_of(c.nodes)
    victim = next(n for n in c.nodes if n is not leader)
    holder = next(n for n in c.nodes if n is not leader and n is not victim)
    tree = tmp_path / "tree"
    make_tree(tree)
    sent = upload_workspace(client(holder), tree)  # only the holder has the blobs
    # The holder's one slot is taken, so the retry goes to the leader, which must fetch
    # the blobs from the holder (node to node), not from this client.
    blocker = submit(holder, {"command": "sleep", "args": ["300"], "node": holder.node_id})
    script = (f'if [ "$OXIDE_NODE_ID" = "{victim.node_id}" ]; then touch started; '
              f'echo started; sleep 300; fi; {LISTING}')
    task = submit(leader, {"command": "sh", "args": ["-c", script], "node": victim.node_id,
                           "retries": 1, "workspace": sent.digest})
    try:
        poll_until(lambda: task_of(holder, blocker["id"])["state"] == "running", 30,
                   message="the holder busy")
        assert blobs_on(leader) == 0

        def started() -> bool:  # read through the leader: it forwards to the owner
            body = leader.agent.get(f"/task/{task['id']}/output")[1]
            return isinstance(body, bytes) and b"started" in body
        poll_until(started, 30, message="the task running on the victim")
        assert blobs_on(victim) >= sent.files + 1  # it fetched them from the holder
        victim.kill()
        killed = time.monotonic()
        survivors = [leader, holder]

        def retry_finished() -> dict[str, Any] | None:
            for node in survivors:
                for candidate in node.get_json("/tasks")["tasks"]:
                    if candidate["retry_of"] == task["id"] and \
                            candidate["state"] not in ("queued", "running"):
                        return dict(candidate)
            return None
        retry = poll_until(retry_finished, 30, message="the retry to end on a survivor")
        assert retry["state"] == "succeeded", retry
        assert retry["attempt"] == 2 and retry["node_id"] != victim.node_id, retry
        assert retry["node_id"] == leader.node_id, retry
        output = leader.agent.get(f"/task/{retry['id']}/output")[1]
        assert output == expected_listing(tree)
        assert blobs_on(leader) >= sent.files + 1  # fetched from the holder
        print(f"\nretry after kill -9: succeeded on the leader with the blobs fetched "
              f"from the holder, {time.monotonic() - killed:.2f} s after the kill")
    finally:
        for task_id in (task["id"], blocker["id"]):
            for process in task_processes(task_id):
                process.kill()

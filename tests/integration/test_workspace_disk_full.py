"""Disk full while a task's tree is unpacked: the task fails saying so, the node stays up.

The agent's ``<state_dir>/workspaces`` is a real 1 MiB tmpfs (root only): the blob cache
beside it has room, the task directory does not.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from oxide_cluster.client import Node
from oxide_cluster.workspace_client import upload_workspace
from tests.support import SECRET, AgentProcess

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk_agent(tmp_path, request):
    agent = AgentProcess(tmp_path / "node")
    workspaces = agent.state_dir / "workspaces"
    workspaces.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                              str(workspaces)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        agent.start()
        yield agent
    finally:
        agent.terminate()
        subprocess.run(["umount", "-l", str(workspaces)], check=False)
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"\n===== log of {agent.name} =====\n{agent.log_text()}")


def test_a_tree_larger_than_the_disk_fails_its_task_and_the_node_stays_up(
        small_disk_agent, tmp_path):
    agent = small_disk_agent
    node = Node(agent.url, SECRET)
    big = tmp_path / "big"
    big.mkdir()
    for index in range(4):  # 2 MiB: the cache takes it, the 1 MiB tmpfs cannot
        (big / f"part{index}.bin").write_bytes(os.urandom(512 * 1024))
    sent = upload_workspace(node, big)
    task = agent.run_task("true", workspace=sent.digest)
    assert task["state"] == "failed", task
    assert "disk full while building the workspace" in task["reason"], task
    # Nothing half-built left behind, and the node carries on.
    assert os.listdir(agent.state_dir / "workspaces") == []
    assert agent.get("/health").status == 200
    small = tmp_path / "small"
    small.mkdir()
    (small / "hello.txt").write_text("still here\n")
    task = agent.run_task("cat", "hello.txt", workspace=upload_workspace(node, small).digest)
    assert task["state"] == "succeeded", task
    assert agent.get(f"/task/{task['id']}/output").body == b"still here\n"

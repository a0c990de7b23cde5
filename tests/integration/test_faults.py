"""Faults on one real agent: kill -9 mid-output, a full disk, an unusable state dir,
and many cancels of process trees. Each prints the figure it measured."""

from __future__ import annotations

import subprocess
import time

import psutil
import pytest

from tests.integration.test_node import task_processes
from tests.support import AgentProcess, poll_until

COUNTER = ('i=0; while true; do i=$((i+1)); echo "line $i"; '
           'if [ $((i % 50)) -eq 0 ]; then sleep 0.01; fi; done')


def test_kill_9_while_writing_keeps_every_acknowledged_byte(agent):
    task = agent.post("/execute", {"command": "sh", "args": ["-c", COUNTER]}).json()
    acknowledged = b""
    for _ in range(5):  # read a few times: each read is bytes the agent acknowledged
        reply = agent.get(f"/task/{task['id']}/output?offset={len(acknowledged)}&wait=5")
        acknowledged += reply.body
    assert len(acknowledged) > 0
    agent.kill()
    for process in task_processes(task["id"]):
        process.kill()
    agent.start()
    after = agent.get(f"/task/{task['id']}/output").body
    print(f"\nacknowledged {len(acknowledged)} bytes before kill -9; "
          f"{len(after)} bytes readable after restart")
    assert after.startswith(acknowledged)
    lines = after.split(b"\n")[:-1]
    assert lines == [f"line {i}".encode() for i in range(1, len(lines) + 1)]
    assert agent.get(f"/task/{task['id']}").json()["state"] == "lost"


def test_state_dir_that_cannot_be_created_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    node = AgentProcess(tmp_path / "n", extra_args=("--state-dir", str(blocker / "state")))
    node.start(wait=False)
    assert node.process.wait(30) != 0
    assert "cannot create state_dir" in node.log_text()
    assert "Traceback" not in node.log_text()


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs as the state dir: a real full disk (needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_gives_clear_errors_and_recovers(tmp_path, small_disk):
    node = AgentProcess(tmp_path / "n", extra_args=("--state-dir", str(small_disk / "state")))
    node.start()
    filler = small_disk / "filler"
    before = node.run_task("sh", "-c", "echo before")
    assert before["state"] == "succeeded"
    with open(filler, "wb") as handle:  # fill the disk to the last byte
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass
    refused = [node.post("/execute", {"command": "sh", "args": ["-c", "head -c 3000000 "
                                                               "/dev/zero"]})
               for _ in range(3)]
    statuses = [reply.status for reply in refused]
    print(f"\nsubmissions on a full disk answered {statuses}")
    assert all(status in (202, 503) for status in statuses)
    assert any(reply.status == 503 and reply.json()["error"]["code"] == "store_unavailable"
               for reply in refused)
    assert node.get("/health").status == 200
    assert node.process.poll() is None
    filler.unlink()
    poll_until(lambda: node.run_task("sh", "-c", "echo after")["state"] == "succeeded",
               timeout=20, message="tasks run again once space is back")
    assert node.get(f"/task/{before['id']}/output").body == b"before\n"
    log = node.log_text()
    assert log.count("could not record task") <= 10, "store failures must not flood the log"
    node.terminate()


def test_many_cancels_of_process_trees_leave_no_orphans(agent_factory):
    node = agent_factory(extra_args=("--max-tasks", "16", "--kill-grace", "2"))
    count = 1000
    started = time.monotonic()
    ids = []
    tree = ["-c", "sleep 300 & sleep 300 & wait"]
    for _ in range(count // 10):
        batch = []
        for _ in range(10):
            reply = node.post("/execute", {"command": "sh", "args": tree})
            assert reply.status == 202, reply
            batch.append(reply.json()["id"])
        for task_id in batch:
            poll_until(lambda task_id=task_id: len(task_processes(task_id)) == 3,
                       timeout=10, message="the tree to start")
        for task_id in batch:
            assert node.post(f"/task/{task_id}/cancel").status in (200, 202)
        for task_id in batch:
            state = node.get(f"/task/{task_id}?wait=10").json()["state"]
            assert state == "cancelled"
        ids += batch
    elapsed = time.monotonic() - started
    orphans = [p for task_id in ids for p in task_processes(task_id)]
    print(f"\n{len(ids)} process trees cancelled in {elapsed:.1f}s; orphans: {len(orphans)}")
    assert orphans == []
    assert psutil.pid_exists(node.pid)


def test_concurrent_clients_get_answers_or_documented_refusals(agent_factory):
    from bench.overload import run_load
    from tests.support import SECRET

    node = agent_factory(extra_args=("--max-tasks", "4"))
    result = run_load([node.port], SECRET, clients=60, tasks_per_client=3, time_limit=120)
    print(f"\n{result['accepted']} accepted, statuses {result['statuses']}, "
          f"p99 {result['p99_ms']:.0f} ms")
    assert result["unexpected"] == []
    assert set(result["statuses"]) <= {200, 202, 429, 503}
    assert result["accepted"] == 180
    assert result["unfinished"] == []

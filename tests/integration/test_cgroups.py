"""A cgroup per task on this host, through a real ``twistd -n oxide-cluster``.

Skipped (with the reason the agent gives) only where the host has no writable cgroup
hierarchy with the memory, cpu and pids controllers.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import psutil
import pytest

from oxide_cluster import cgroups
from tests.support import poll_until


def _host_mode() -> cgroups.CgroupProvider:
    return cgroups.detect("auto", f"probe{secrets.token_hex(4)}")


@pytest.fixture(scope="module")
def host_provider():
    provider = _host_mode()
    if provider.mode == "off":
        pytest.skip(f"this host gives no writable cgroup: {provider.describe()['why']}")
    yield provider
    provider.close()


@pytest.fixture
def cg_agent(agent_factory, host_provider):
    agent = agent_factory()
    ready = agent.get("/ready").json()
    assert ready["cgroups"] == host_provider.mode, ready
    return agent


def _marker() -> str:
    """A ``sleep`` duration no other process on the host uses: finds the escaped one."""
    return f"299.{secrets.randbelow(10 ** 8):08d}"


def _with_marker(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if marker in (process.info["cmdline"] or []):
            found.append(process)
    return found


def test_setsid_escape_dies_on_cancel(cg_agent):
    marker = _marker()
    script = f"setsid sleep {marker} </dev/null >/dev/null 2>&1 & echo started; sleep 300"
    task = cg_agent.post("/execute", {"command": "sh", "args": ["-c", script]}).json()
    poll_until(lambda: _with_marker(marker), message="the setsid escape to start")
    escaped = _with_marker(marker)[0]
    assert os.getsid(escaped.pid) == escaped.pid  # it left the task's session
    assert cg_agent.post(f"/task/{task['id']}/cancel").status in (200, 202)
    ended = cg_agent.get(f"/task/{task['id']}?wait=20").json()
    assert ended["state"] == "cancelled"
    # The task is recorded as ended only once its cgroup is empty: nothing is left now.
    assert _with_marker(marker) == []


def test_setsid_escape_dies_when_the_command_exits(cg_agent, tmp_path):
    marker = _marker()
    up = tmp_path / "up"
    # The command exits only once the escape runs in its own session (else the group
    # kill at exit could catch it before its setsid).
    script = (f"setsid sh -c 'echo up > {up}; exec sleep {marker}' </dev/null >/dev/null"
              f" 2>&1 & while [ ! -s {up} ]; do :; done; echo started")
    task = cg_agent.run_task("sh", "-c", script)
    assert task["state"] == "succeeded", task
    assert _with_marker(marker) == []


def test_double_fork_escape_dies_at_timeout(cg_agent):
    marker = _marker()
    script = f"(setsid sh -c 'sleep {marker}' </dev/null >/dev/null 2>&1 &); sleep 300"
    task = cg_agent.run_task("sh", "-c", script, timeout=1.5)
    assert task["state"] == "timed_out", task
    assert _with_marker(marker) == []


def test_memory_limit_ends_task_oom_killed_and_agent_lives(cg_agent):
    hog = "x = []\nwhile True:\n    x.append(bytearray(8 * 1024 * 1024))\n"
    task = cg_agent.run_task(sys.executable, "-c", hog, resources={"memory": "64M"})
    assert task["state"] == "failed", task
    assert task["oom_killed"] is True
    assert "memory limit (64 MiB)" in task["reason"], task["reason"]
    assert task["resources"] == {"memory": 64 * 1024 * 1024}
    assert task["usage"]["memory_peak_bytes"] <= 64 * 1024 * 1024
    assert cg_agent.get("/health").status == 200
    assert cg_agent.process.poll() is None


def test_usage_of_one_second_of_cpu(cg_agent):
    burn = ("import time\nend = time.process_time() + 1.0\n"
            "while time.process_time() < end:\n    pass\n")
    task = cg_agent.run_task(sys.executable, "-c", burn)
    assert task["state"] == "succeeded", task
    usage = task["usage"]
    assert usage["source"] == "cgroup"
    assert 0.8 <= usage["cpu_seconds"] <= 1.5, usage
    assert usage["memory_peak_bytes"] > 1024 * 1024
    assert usage["processes_peak"] >= 1
    assert task["oom_killed"] is False


def test_pids_limit_holds_against_a_fork_loop(cg_agent):
    # 60 background sleeps against a limit of 16: the shell cannot fork past it.
    script = "for i in $(seq 60); do sleep 3 & done 2>/dev/null; wait"
    task = cg_agent.run_task("sh", "-c", script, resources={"pids": 16}, timeout=30)
    assert task["resources"] == {"pids": 16}
    assert task["usage"]["processes_peak"] <= 16, task["usage"]
    assert task["usage"]["processes_peak"] >= 10, task["usage"]


def test_cpu_limit_slows_a_busy_task(cg_agent):
    # Two busy threads under cpus=0.2: at most ~0.2 s of CPU per wall second.
    burn = ("import threading, time\nend = time.time() + 1.5\n"
            "def spin():\n    while time.time() < end:\n        pass\n"
            "threads = [threading.Thread(target=spin) for _ in range(2)]\n"
            "[t.start() for t in threads]; [t.join() for t in threads]\n")
    task = cg_agent.run_task(sys.executable, "-c", burn, resources={"cpus": 0.2})
    assert task["state"] == "succeeded", task
    assert task["usage"]["cpu_seconds"] < 0.6, task["usage"]


def test_stats_and_log_name_the_mode(cg_agent, host_provider):
    stats = cg_agent.get("/stats").json()
    assert stats["cgroups"]["mode"] == host_provider.mode
    assert set(cgroups.V1_REQUIRED) <= set(stats["cgroups"]["controllers"])
    poll_until(lambda: f"tasks run in cgroups {host_provider.mode}" in cg_agent.log_text(),
               message="the log line naming the mode")


def test_cgroups_off_keeps_process_groups(agent_factory):
    agent = agent_factory(extra_args=("--cgroups", "off"))
    assert agent.get("/ready").json()["cgroups"] == "off"
    task = agent.run_task("sh", "-c", "echo hi")
    assert task["state"] == "succeeded" and task["oom_killed"] is False


def test_what_a_killed_agent_left_in_task_cgroups_is_gone_after_the_next_start(cg_agent,
                                                                              host_provider):
    marker = _marker()
    script = (f"setsid sh -c 'exec sleep {marker}' </dev/null >/dev/null 2>&1 & "
              f"exec sleep {marker}")
    task = cg_agent.post("/execute", {"command": "sh", "args": ["-c", script]}).json()
    poll_until(lambda: len(_with_marker(marker)) == 2,
               message="the task and its setsid escape to start")
    node_id = task["node_id"]
    cg_agent.kill()  # SIGKILL: no stop, no cgroup kill
    left = _with_marker(marker)
    assert len(left) == 2  # both outlive the agent...
    task_cgroups = [line for process in left
                    for line in Path(f"/proc/{process.pid}/cgroup").read_text().splitlines()
                    if f"oxide-{node_id}/{task['id']}" in line]
    assert task_cgroups  # ...inside the task's cgroup
    cg_agent.start()  # same state dir, same node id
    poll_until(lambda: _with_marker(marker) == [], timeout=20,
               message="the leftover processes to be killed")
    assert cg_agent.get("/ready").json()["cgroups"] == host_provider.mode
    poll_until(lambda: not any(os.path.exists(f"{base}/{task['id']}")
                               for base in _bases(host_provider, node_id)),
               message="the leftover cgroups to be removed")
    assert "task cgroups left by a previous agent killed and removed" in cg_agent.log_text()


def _bases(provider: cgroups.CgroupProvider, node_id: str) -> list[str]:
    """Where this node's task cgroups live, per the probe's layout (same parents)."""
    root = provider.describe()["root"]
    probes = root.values() if isinstance(root, dict) else [root]
    return [os.path.join(os.path.dirname(str(probe)), f"oxide-{node_id}") for probe in probes]

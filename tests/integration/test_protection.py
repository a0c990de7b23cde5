"""The agent's protection from its tasks, through a real ``twistd -n oxide-cluster``."""

from __future__ import annotations

import os

import pytest

from oxide_cluster import protection


def test_a_task_burning_one_cpu_second_reports_it_sampled_without_a_cgroup(agent_factory):
    agent = agent_factory(extra_args=("--cgroups", "off"))
    burn = "import time\nend = time.process_time() + 1\nwhile time.process_time() < end: pass"
    task = agent.run_task("python3", "-c", burn)
    assert task["state"] == "succeeded", task
    usage = task["usage"]
    assert usage["source"] == "sampled", usage
    assert 0.8 <= usage["cpu_seconds"] <= 1.5, usage
    assert usage["memory_peak_bytes"] > 2 ** 20 and usage["processes_peak"] >= 1


def test_tasks_are_the_oom_killers_first_choice_and_the_agent_is_non_dumpable(agent_factory):
    agent = agent_factory(extra_args=("--cgroups", "off"))
    task = agent.run_task("sh", "-c", "cat /proc/self/oom_score_adj")
    out = agent.get(f"/task/{task['id']}/output").body.decode()
    assert int(out.split()[0]) == protection.TASK_OOM_SCORE_ADJ
    agent_adj = protection.oom_score_adj(agent.pid)
    assert agent_adj is not None and agent_adj < protection.TASK_OOM_SCORE_ADJ
    assert "non-dumpable True" in agent.log_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="run_as needs the agent to run as root")
def test_a_task_run_as_another_user_cannot_read_the_agents_environ(agent_factory):
    agent = agent_factory(extra_args=("--cgroups", "off", "--run-as", "nobody"))
    task = agent.run_task("sh", "-c", f"id -u; cat /proc/{agent.pid}/environ")
    output = agent.get(f"/task/{task['id']}/output").body.decode(errors="replace")
    assert task["state"] == "failed", (task, output)
    assert output.split()[0] != "0"
    assert "OXIDE_CLUSTER_SECRET" not in output and "Permission denied" in output

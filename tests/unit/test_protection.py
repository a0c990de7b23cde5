"""The agent's protection from its tasks, and usage where no cgroup counts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from oxide_cluster import protection
from oxide_cluster.cli import usage_line
from oxide_cluster.sampling import TreeSampler

PROBE = """
import json, os
from oxide_cluster import protection
state = protection.protect_agent()
state["dumpable_after"] = protection.dumpable()
state["child"] = os.popen("cat /proc/self/oom_score_adj").read().strip()
print(json.dumps(state))
"""


def test_the_agent_becomes_non_dumpable_and_least_preferred_by_the_oom_killer():
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True).stdout
    state = json.loads(out)
    assert state["non_dumpable"] is True and state["dumpable_after"] is False
    if state["oom_score_adj_lowered"]:
        assert state["oom_score_adj"] == protection.AGENT_OOM_SCORE_ADJ
    assert state["oom_score_adj"] < protection.TASK_OOM_SCORE_ADJ


def test_run_as_names_a_real_user_and_is_ignored_unless_root(monkeypatch):
    with pytest.raises(ValueError, match="no user"):
        protection.resolve_user("no-such-user-here")
    assert protection.resolve_user(None) is None
    monkeypatch.setattr(protection.os, "geteuid", lambda: 0)
    nobody = protection.resolve_user("nobody")
    assert nobody is not None and nobody.uid != 0
    monkeypatch.setattr(protection.os, "geteuid", lambda: 1000)
    assert protection.resolve_user("nobody") is None


def test_a_process_tree_is_sampled_for_cpu_memory_and_processes():
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         "kids = [subprocess.Popen(['sleep', '30']) for _ in range(2)]\n"
         "end = time.process_time() + 0.3\n"
         "while time.process_time() < end: pass\n"
         "print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        sampler = TreeSampler(child.pid)
        sampler.sample()
        usage = sampler.usage()
        assert usage.source == "sampled" and usage.processes_peak == 3
        assert 0.25 <= (usage.cpu_seconds or 0) < 5
        assert (usage.memory_peak_bytes or 0) > 2 ** 20
        assert sampler.usage(reaped_cpu=9.0).cpu_seconds == 9.0  # the exact figure wins
    finally:
        for process in __import__("psutil").Process(child.pid).children(recursive=True):
            process.kill()
        child.kill()
        child.wait()


def test_the_cli_end_of_run_line():
    assert usage_line({"cpu_seconds": 12.34, "memory_peak_bytes": 410 * 2**20,
                       "processes_peak": 3, "source": "cgroup"}) == \
        "cpu 12.3 s, peak memory 410 MiB"
    assert usage_line({"cpu_seconds": 0.5, "memory_peak_bytes": None,
                       "source": "sampled"}) == "cpu 0.5 s (sampled)"
    assert usage_line(None) is None and usage_line({"source": "cgroup"}) is None

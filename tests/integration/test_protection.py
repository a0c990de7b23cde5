"""The agent's protection from its tasks, through a real ``twistd -n oxide-cluster``."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from oxide_cluster import protection
from oxide_cluster.client import Node
from oxide_cluster.manifest import digest_bytes
from oxide_cluster.workspace_client import upload_workspace
from tests.support import SECRET


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


@pytest.fixture
def open_dir():
    """A directory under /tmp every user may enter (pytest's own are 0700, root's)."""
    made = Path(tempfile.mkdtemp(prefix="oxide-run-as-"))
    made.chmod(0o711)
    yield made
    shutil.rmtree(made, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="run_as needs the agent to run as root")
def test_a_workspace_task_run_as_nobody_owns_its_directory_not_the_state_or_the_cache(
        agent_factory, tmp_path, open_dir):
    task_dir = open_dir / "tasks"
    agent = agent_factory(extra_args=("--cgroups", "off", "--run-as", "nobody",
                                      "--task-dir", str(task_dir)))
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "a.txt").write_text("from the workspace\n")
    (tree / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tree / "run.sh").chmod(0o755)
    upload = upload_workspace(Node(agent.url, SECRET), tree)
    digest = digest_bytes(b"from the workspace\n")
    blob = agent.state_dir / "cas" / digest[:2] / digest
    script = (f"id -u; pwd; ls; ./run.sh; cat src/a.txt; echo made > out.txt; "
              f"echo changed >> src/a.txt && echo WROTE_COPY; "
              f"ls {agent.state_dir} >/dev/null 2>&1 || echo STATE_CLOSED; "
              f"cat {blob} >/dev/null 2>&1 || echo CACHE_CLOSED; "
              f"ls {task_dir} >/dev/null 2>&1 || echo PARENT_UNLISTED")
    task = agent.run_task("sh", "-c", script, workspace=upload.digest,
                          artifacts=["out.txt", "src/*.txt"])
    output = agent.get(f"/task/{task['id']}/output").body.decode(errors="replace")
    assert task["state"] == "succeeded", (task, output, agent.log_text())
    lines = output.splitlines()
    assert lines[0] != "0" and int(lines[0]) == pwd.getpwnam("nobody").pw_uid
    assert lines[1] == str(task_dir / task["id"])
    assert lines[2:] == ["run.sh", "src", "ran", "from the workspace", "WROTE_COPY",
                         "STATE_CLOSED", "CACHE_CLOSED", "PARENT_UNLISTED"], output
    listing = agent.get(f"/task/{task['id']}/artifacts").json()
    kept = {entry["path"]: entry["sha256"] for entry in listing["artifacts"]}
    assert kept == {"out.txt": digest_bytes(b"made\n"),
                    "src/a.txt": digest_bytes(b"from the workspace\nchanged\n")}, listing
    # The task changed its own copy; the cache's blob is untouched.
    assert blob.read_bytes() == b"from the workspace\n"
    assert stat.S_IMODE(task_dir.stat().st_mode) == 0o711 and task_dir.stat().st_uid == 0
    assert stat.S_IMODE(agent.state_dir.stat().st_mode) == 0o700
    assert not (task_dir / task["id"]).exists()  # removed after


@pytest.mark.skipif(os.geteuid() != 0, reason="run_as needs the agent to run as root")
def test_a_workspace_task_fails_saying_why_when_nobody_cannot_reach_task_dir(
        agent_factory, tmp_path):
    # The default, <state_dir>-tasks, is under pytest's 0700 directory here.
    agent = agent_factory(extra_args=("--cgroups", "off", "--run-as", "nobody"))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("x\n")
    upload = upload_workspace(Node(agent.url, SECRET), tree)
    task = agent.run_task("true", workspace=upload.digest)
    assert task["state"] == "failed", task
    assert "run_as user nobody cannot enter" in task["reason"], task
    assert (agent.state_dir.parent / "state-tasks").is_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="run_as needs the agent to run as root")
def test_a_git_source_task_run_as_nobody_reads_its_own_objects(agent_factory, tmp_path,
                                                               open_dir):
    from tests.integration.test_git_source import git, make_repository

    bare, work = make_repository(tmp_path / "repo")
    agent = agent_factory(extra_args=("--cgroups", "off", "--run-as", "nobody",
                                      "--task-dir", str(open_dir / "tasks")))
    # Borrowing the mirror's objects (in the 0700 state dir) would fail rev-parse here.
    task = agent.run_task("sh", "-c", "cat src/version.txt; git rev-parse HEAD; "
                          "git cat-file -p HEAD:src/version.txt",
                          source={"git": str(bare), "ref": "main"})
    output = agent.get(f"/task/{task['id']}/output").body.decode(errors="replace")
    assert task["state"] == "succeeded", (task, output)
    assert output.splitlines()[-3:] == ["one", git("rev-parse", "HEAD", cwd=work), "one"]

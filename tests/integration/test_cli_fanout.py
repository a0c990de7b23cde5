"""``oxide-cluster run --parallel N`` against a real node with two slots: shards, split
files, prefixes, one exit code, one merged JUnit report, Ctrl-C."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

from oxide_cluster.workspace_client import junit_summary
from tests.integration.test_cli import cli, finished
from tests.support import http, poll_until

# Prints its files and its environment; the second shard (index 1) fails with 3. Each
# test file becomes a test case of a JUnit report, failing when its name says so.
SHARD = """import os, sys
from xml.sax.saxutils import quoteattr
files = sys.argv[1:]
print("files:", *files)
print("env:", *(os.environ[name] for name in (
    "OXIDE_SHARD_INDEX", "OXIDE_SHARD_TOTAL", "CI_NODE_INDEX", "CI_NODE_TOTAL",
    "BUILDKITE_PARALLEL_JOB", "BUILDKITE_PARALLEL_JOB_COUNT")))
cases = "".join("<testcase name=" + quoteattr(f) + ">" +
                ("<failure/>" if "fail" in f else "") + "</testcase>" for f in files)
os.makedirs("reports", exist_ok=True)
with open("reports/junit.xml", "w") as report:
    report.write('<testsuite name="s' + os.environ["OXIDE_SHARD_INDEX"] + '" time="0.5">'
                 + cases + "</testsuite>")
sys.exit(3 if os.environ["OXIDE_SHARD_INDEX"] == "1" else 0)
"""
NAMES = ["alpha", "bravo", "charlie", "delta", "echo_fail", "foxtrot", "golf"]


def _tree(root: Path) -> Path:
    (root / "tests" / "deeper").mkdir(parents=True)
    for index, name in enumerate(NAMES):
        (root / "tests" / f"{name}.txt").write_text("x" * (100 * (index + 1)))
    (root / "tests" / "deeper" / "not_matched.txt").write_text("no")
    (root / "tests" / "other.py").write_text("no")
    (root / "shard.py").write_text(SHARD)
    return root


def _agent(agent_factory):
    return agent_factory(extra_args=("--max-tasks", "2"))


def test_three_shards_split_the_files_prefix_their_lines_and_exit_with_the_failing_code(
        agent_factory, tmp_path):
    agent = _agent(agent_factory)
    tree = _tree(tmp_path / "project")
    code, out, err = finished(cli(
        agent.url, "run", "--parallel", "3", "--workspace", str(tree),
        "--split", "tests/*.txt", "--junit", "reports/*.xml",
        "--artifacts-dir", str(tmp_path / "out"), "--",
        sys.executable, "shard.py", "{files}"), timeout=90)
    stdout, stderr = out.decode(), err.decode()

    assert code == 3, stderr
    assert "shard 2/3 (task " in stderr and "failed with exit 3" in stderr, stderr
    lines = stdout.splitlines()
    assert lines and all(re.match(r"\[[1-3]/3\] ", line) for line in lines), stdout
    files: dict[str, list[str]] = {}
    envs: dict[str, list[str]] = {}
    for line in lines:
        prefix, kind, *values = line.split(" ")
        (files if kind == "files:" else envs)[prefix] = values
    assert sorted(files) == ["[1/3]", "[2/3]", "[3/3]"], stdout
    every = sorted(name for names in files.values() for name in names)
    assert every == sorted(f"tests/{name}.txt" for name in NAMES), stdout
    for prefix, values in envs.items():
        index = int(prefix[1]) - 1
        assert values == [str(index), "3", str(index + 1), "3", str(index), "3"], stdout
    # One upload of 10 files; the workspace line is said once.
    assert stderr.count("workspace ") == 1 and "10 files" in stderr, stderr

    merged = (tmp_path / "out" / "junit.xml").read_bytes()
    summary = junit_summary(merged)
    assert summary is not None and (summary.tests, summary.failures) == (7, 1), merged
    assert "junit total" in stderr and "7 tests, 1 failures, 0 errors, 0 skipped" in stderr
    assert re.search(r"slowest shard [1-3]/3 \d+\.\d\ds", stderr), stderr
    for index in (1, 2, 3):
        assert (tmp_path / "out" / f"shard-{index}" / "reports" / "junit.xml").exists()


def test_group_output_prints_each_shard_in_one_piece_in_shard_order(agent_factory, tmp_path):
    agent = _agent(agent_factory)
    code, out, err = finished(cli(
        agent.url, "run", "--parallel", "3", "--group-output", "--", "sh", "-c",
        'echo "one $OXIDE_SHARD_INDEX"; sleep 0.2; echo "two $OXIDE_SHARD_INDEX"'),
        timeout=60)
    assert code == 0, err
    lines = out.decode().splitlines()
    assert [line for line in lines if not line.startswith("==>")] == \
        ["one 0", "two 0", "one 1", "two 1", "one 2", "two 2"], lines
    assert re.match(r"==> shard 1/3, task \S+: exit 0 <==", lines[0]), lines


def test_split_without_a_workspace_is_a_usage_error(agent):
    code, _, err = finished(cli(agent.url, "run", "--parallel", "2", "--split", "*.py",
                                "--", "echo", "{files}"))
    assert code == 2
    assert b"--split needs --workspace" in err


def test_suite_without_split_is_a_one_line_usage_error(agent, tmp_path):
    for extra in (("--parallel", "2", "--workspace", str(tmp_path)), ()):
        code, out, err = finished(cli(agent.url, "run", *extra, "--suite", "s", "--",
                                      "echo", "x"))
        assert code == 2, (extra, err)
        assert err.count(b"\n") == 1 and b"--suite NAME needs --split GLOB" in err, err
        assert out == b""


def test_ctrl_c_cancels_every_shard(agent_factory):
    agent = _agent(agent_factory)
    run = cli(agent.url, "run", "--parallel", "2", "--", "sleep", "300")
    poll_until(lambda: len(http("GET", agent.url + "/tasks?state=running").json()["tasks"])
               == 2, 30, message="both shards running")
    run.send_signal(signal.SIGINT)
    code, _, err = finished(run, timeout=30)
    assert code == 125, err
    assert b"cancelling 2 shards" in err, err
    tasks = http("GET", agent.url + "/tasks").json()["tasks"]
    assert [task["state"] for task in tasks] == ["cancelled", "cancelled"], tasks

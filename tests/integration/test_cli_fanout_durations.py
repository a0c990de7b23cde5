"""``run --split`` with recorded durations: the cluster's history changes the split, a run
records what it measured, and with Redis every node answers the same."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.integration.test_cli import cli, finished
from tests.support import http

# Prints its files; writes a JUnit report whose cases name their file (pytest's xunit1).
SHARD = """import os, sys
from xml.sax.saxutils import quoteattr
files = sys.argv[1:]
print("files:", *files)
os.makedirs("reports", exist_ok=True)
with open("reports/junit.xml", "w") as report:
    report.write("<testsuite>" + "".join(
        "<testcase file=" + quoteattr(f) + ' name="t" time="' + str(len(f)) + '"/>'
        for f in files) + "</testsuite>")
"""


def _tree(root: Path) -> Path:
    (root / "tests").mkdir(parents=True)
    for name, size in (("big", 900), ("large", 800), ("small", 100), ("tiny", 50)):
        (root / "tests" / f"{name}.txt").write_text("x" * size)
    (root / "shard.py").write_text(SHARD)
    return root


def _split(url: str, tree: Path, out: Path) -> tuple[list[list[str]], str]:
    code, stdout, stderr = finished(cli(
        url, "run", "--parallel", "2", "--workspace", str(tree), "--split", "tests/*.txt",
        "--junit", "reports/*.xml", "--artifacts-dir", str(out), "--",
        sys.executable, "shard.py", "{files}"), timeout=90)
    assert code == 0, stderr
    parts = sorted(sorted(line.split(" ")[2:]) for line in stdout.decode().splitlines()
                   if " files: " in line)
    return parts, stderr.decode()


def test_recorded_durations_change_the_split_and_each_run_records_its_own(
        agent_factory, tmp_path):
    agent = agent_factory(extra_args=("--max-tasks", "2"))
    tree = _tree(tmp_path / "proj")

    parts, stderr = _split(agent.url, tree, tmp_path / "out1")
    assert "split 4 files by size" in stderr, stderr
    assert parts == [["tests/big.txt", "tests/tiny.txt"],
                     ["tests/large.txt", "tests/small.txt"]], parts
    # The run recorded each file's seconds from its test cases (the suite: "proj").
    recorded = http("GET", agent.url + "/suites/proj/durations").json()
    assert recorded["durations"] == {"tests/big.txt": 13.0, "tests/large.txt": 15.0,
                                     "tests/small.txt": 15.0, "tests/tiny.txt": 14.0}

    # History says the tiny file is the slow one: it gets a shard of its own.
    reply = http("PUT", agent.url + "/suites/proj/durations", body={
        "durations": {"tests/big.txt": 1, "tests/large.txt": 1, "tests/small.txt": 1,
                      "tests/tiny.txt": 5}})
    assert reply.status == 200, reply.body
    parts, stderr = _split(agent.url, tree, tmp_path / "out2")
    assert "split 4 files by durations of suite proj" in stderr, stderr
    assert parts == [["tests/big.txt", "tests/large.txt", "tests/small.txt"],
                     ["tests/tiny.txt"]], parts


def test_with_redis_the_durations_are_the_cluster_s_not_a_node_s(agent_factory, redis):
    first = agent_factory(extra_args=("--redis", redis.url))
    second = agent_factory(extra_args=("--redis", redis.url))
    body = {"durations": {"tests/a.py": 2.5}}
    reply = http("PUT", first.url + "/suites/s1/durations",
                 body=body)
    assert reply.status == 200, reply.body
    got = http("GET", second.url + "/suites/s1/durations").json()
    assert got == {"suite": "s1", "recorded": True, "durations": {"tests/a.py": 2.5}}

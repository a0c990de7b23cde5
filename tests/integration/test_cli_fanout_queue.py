"""``run --parallel N --split GLOB --queue-split`` against a real node: workers take
batches until the queue is empty, and a batch whose process is killed goes back to it."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from tests.integration.test_cli import cli, finished

# A batch: prints its files, then, the first time it holds tests/kill_07.txt, kills itself
# with SIGKILL half-way (after writing a partial report); else writes one test case per
# file.
BATCH = """import os, signal, sys
from xml.sax.saxutils import quoteattr
marker, files = sys.argv[1], sys.argv[2:]
print("files:", *files, flush=True)
os.makedirs("reports", exist_ok=True)
def report(names):
    with open("reports/junit.xml", "w") as out:
        out.write("<testsuite>" + "".join("<testcase file=" + quoteattr(f) + ' name="t"/>'
                                          for f in names) + "</testsuite>")
if "tests/kill_07.txt" in files and not os.path.exists(marker):
    open(marker, "w").close()
    report(files[: len(files) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
report(files)
"""
NAMES = [f"tests/{'kill' if i == 7 else 'file'}_{i:02d}.txt" for i in range(24)]


def test_every_file_is_run_by_exactly_one_batch_even_when_a_worker_is_killed(
        agent_factory, tmp_path):
    agent = agent_factory(extra_args=("--max-tasks", "3"))
    tree = tmp_path / "proj"
    (tree / "tests").mkdir(parents=True)
    for index, name in enumerate(NAMES):
        (tree / name).write_text("x" * (10 + index))
    (tree / "batch.py").write_text(BATCH)
    marker = tmp_path / "killed-once"
    code, out, err = finished(cli(
        agent.url, "run", "--parallel", "3", "--workspace", str(tree),
        "--split", "tests/*.txt", "--queue-split", "--junit", "reports/*.xml",
        "--artifacts-dir", str(tmp_path / "out"), "--",
        sys.executable, "batch.py", str(marker), "{files}"), timeout=120)
    stdout, stderr = out.decode(), err.decode()

    assert code == 0, stderr
    assert marker.exists()
    assert "signal 9): its " in stderr and "go back to the queue" in stderr, stderr
    assert "1 returned to the queue" in stderr, stderr
    batches = [line.split(" ")[2:] for line in stdout.splitlines() if " files: " in line]
    assert len(batches) >= 4, stdout  # more batches than workers: it is a queue
    # The killed batch's files ran twice (once cut short); the others once.
    ran = sorted(name for files in batches for name in files)
    killed = next(files for files in batches if "tests/kill_07.txt" in files)
    assert ran == sorted(NAMES + killed), stdout
    # The merged report holds each file exactly once: the dead batch's is left out.
    merged = ElementTree.parse(tmp_path / "out" / "junit.xml").getroot()
    reported = sorted(case.get("file") or "" for case in merged.iter("testcase"))
    assert reported == sorted(NAMES), reported
    assert merged.get("tests") == str(len(NAMES))
    assert "junit total" in stderr and f"{len(NAMES)} tests, 0 failures" in stderr, stderr


def test_queue_split_needs_split(agent):
    code, _, err = finished(cli(agent.url, "run", "--parallel", "2", "--queue-split",
                                "--workspace", str(Path(__file__).parent), "--",
                                "echo", "{files}"))
    assert code == 2
    assert b"--queue-split needs --split" in err, err


# A batch whose runner starts slowly (0.8 s before its first test, as imports and
# collection) and then spends 0.02 s per file, which its report says.
SLOW_START = """import os, sys, time
from xml.sax.saxutils import quoteattr
time.sleep(0.8)
files = sys.argv[1:]
print("files:", *files, flush=True)
began = time.monotonic()
cases = ""
for name in files:
    time.sleep(0.02)
    cases += "<testcase file=" + quoteattr(name) + ' name="t" time="0.02"/>'
os.makedirs("reports", exist_ok=True)
with open("reports/junit.xml", "w") as out:
    out.write('<testsuite time="%.3f">' % (time.monotonic() - began) + cases + "</testsuite>")
"""


def test_batches_grow_once_the_start_up_is_known(agent_factory, tmp_path):
    agent = agent_factory(extra_args=("--max-tasks", "3"))
    tree = tmp_path / "proj"
    (tree / "tests").mkdir(parents=True)
    names = [f"tests/file_{i:02d}.txt" for i in range(24)]
    for index, name in enumerate(names):
        (tree / name).write_text("x" * (10 + index))
    (tree / "batch.py").write_text(SLOW_START)
    code, out, err = finished(cli(
        agent.url, "run", "--parallel", "3", "--workspace", str(tree), "--suite", "slow",
        "--split", "tests/*.txt", "--queue-split", "--junit", "reports/*.xml",
        "--artifacts-dir", str(tmp_path / "out"), "--",
        sys.executable, "batch.py", "{files}"), timeout=120)
    stdout, stderr = out.decode(), err.decode()
    assert code == 0, stderr
    batches = [line.split(" ")[2:] for line in stdout.splitlines() if " files: " in line]
    assert sorted(name for files in batches for name in files) == names, stdout
    # Sized by the files alone (the first run: by size) it would take 14 batches of 1 or
    # 2 files, each paying the 0.8 s start-up; once one batch has told the start-up, the
    # next ones take up to a worker's share of what is left.
    sizes = [len(files) for files in batches]
    assert len(batches) <= 9 and max(sizes) >= 4, sizes
    startup = float(stderr.split("start-up ~")[1].split("s")[0])
    assert 0.8 <= startup < 3.0, stderr
    wall = stderr.split("; wall ")[1].split("s")[0]
    print(f"\nbatch sizes {sizes}, start-up estimate {startup:.2f}s, wall {wall}s")

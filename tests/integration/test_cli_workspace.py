"""``oxide-cluster run --workspace``: the tree goes in by content, artifacts come back."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.integration.test_cli import cli, finished

JUNIT = ('<testsuite name="s" tests="3" failures="1" errors="0" skipped="1" time="0.5">'
         '<testcase name="a"/><testcase name="b"><failure/></testcase>'
         '<testcase name="c"><skipped/></testcase></testsuite>')
SCRIPT = f"""set -e
pwd
cat src/input.txt
mkdir -p reports
printf '%s' '{JUNIT}' > reports/junit.xml
echo built > reports/build.log
exit 4
"""


def _tree(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "src" / "input.txt").write_text("first version\n")
    for index in range(5):
        (root / f"file{index}.txt").write_text(f"unchanged {index}\n")
    (root / "run.sh").write_text(SCRIPT)
    return root


def _run(url: str, tree: Path, out: Path) -> tuple[int, str, str]:
    code, stdout, stderr = finished(cli(
        url, "run", "--workspace", str(tree), "--artifacts", "reports/*.xml",
        "--artifacts", "reports/*.log", "--artifacts-dir", str(out), "--",
        "sh", "run.sh"), timeout=60)
    return code, stdout.decode(), stderr.decode()


def test_run_with_a_workspace_sends_changes_only_and_brings_artifacts_back(agent, tmp_path):
    tree = _tree(tmp_path / "client" / "project")

    code, stdout, stderr = _run(agent.url, tree, tmp_path / "out1")
    assert code == 4, stderr
    task_dir, content = stdout.splitlines()[:2]
    assert task_dir != str(tree) and task_dir.startswith(str(agent.state_dir)), stdout
    assert content == "first version"
    assert re.search(r"workspace .*: 7 files, \d+ bytes; sent 8 blobs", stderr), stderr
    assert (tmp_path / "out1" / "reports" / "build.log").read_text() == "built\n"
    assert (tmp_path / "out1" / "reports" / "junit.xml").read_text() == JUNIT
    assert "3 tests, 1 failures, 0 errors, 1 skipped in 0.50s" in stderr
    assert not Path(task_dir).exists(), "the task directory outlived the task"

    (tree / "src" / "input.txt").write_text("second version\n")
    code, stdout, stderr = _run(agent.url, tree, tmp_path / "out2")
    assert code == 4, stderr
    assert stdout.splitlines()[1] == "second version"
    # The changed file and the new manifest; nothing else travels again.
    assert re.search(r"sent 2 blobs", stderr), stderr


def test_artifacts_without_a_workspace_is_a_usage_error(agent):
    code, _, stderr = finished(cli(agent.url, "run", "--artifacts", "*.xml", "--", "true"))
    assert code == 2
    assert b"--artifacts needs --workspace" in stderr


def test_workspace_in_a_git_tree_leaves_ignored_files_out(agent, tmp_path):
    tree = _tree(tmp_path / "repo")
    (tree / ".gitignore").write_text("build/\n")
    (tree / "build").mkdir()
    (tree / "build" / "big.bin").write_bytes(b"x" * 4096)
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    code, stdout, stderr = finished(cli(
        agent.url, "run", "--workspace", str(tree), "--", "sh", "-c",
        "test ! -e build/big.bin && cat src/input.txt"), timeout=60)
    assert code == 0, stderr
    assert stdout.decode() == "first version\n"
    assert re.search(rb"workspace .*: 8 files", stderr), stderr

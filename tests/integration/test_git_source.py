"""Git sources on a real agent: cloned through the node's mirror, fetched the second time."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import (
    SECRET,  # noqa: F401  (the agent fixture's secret)
    poll_until,
)


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid",
                           *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def make_repository(tmp_path: Path) -> tuple[Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    bare, work = tmp_path / "repo.git", tmp_path / "work"
    subprocess.run(["git", "init", "--bare", "-q", str(bare)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "src").mkdir()
    (work / "src" / "version.txt").write_text("one\n")
    git("add", ".", cwd=work)
    git("commit", "-qm", "one", cwd=work)
    git("push", "-q", str(bare), "main", cwd=work)
    return bare, work


def objects_in(mirror: Path) -> int:
    counted = subprocess.run(["git", "--git-dir", str(mirror), "count-objects", "-v"],
                             check=True, capture_output=True, text=True).stdout
    fields = dict(line.split(": ") for line in counted.splitlines())
    return int(fields["count"]) + int(fields["in-pack"])


def test_git_source_clones_once_then_fetches_only_new_objects(agent, tmp_path):
    bare, work = make_repository(tmp_path)
    first_commit = git("rev-parse", "HEAD", cwd=work)
    task = agent.run_task("sh", "-c", "pwd; cat src/version.txt; git rev-parse HEAD",
                          source={"git": str(bare), "ref": "main"})
    assert task["state"] == "succeeded", task
    out = agent.get(f"/task/{task['id']}/output").body.decode().splitlines()
    assert out == [str(agent.state_dir / "workspaces" / task["id"]), "one", first_commit]
    mirrors = list((agent.state_dir / "git").iterdir())
    assert len(mirrors) == 1
    mirror = mirrors[0]
    before = objects_in(mirror)
    packs_before = sorted(p.name for p in (mirror / "objects" / "pack").glob("*.pack"))

    (work / "src" / "version.txt").write_text("two\n")
    git("commit", "-qam", "two", cwd=work)
    git("push", "-q", str(bare), "main", cwd=work)
    second_commit = git("rev-parse", "HEAD", cwd=work)
    task = agent.run_task("sh", "-c", "cat version.txt; git rev-parse HEAD",
                          source={"git": str(bare), "ref": second_commit}, cwd="src")
    assert task["state"] == "succeeded", task
    out = agent.get(f"/task/{task['id']}/output").body.decode().splitlines()
    assert out == ["two", second_commit]
    # The mirror was fetched into, not cloned again: the old pack is still there and
    # only the new commit's objects (commit, two trees, one blob) were added.
    assert sorted(p.name for p in (mirror / "objects" / "pack").glob("*.pack"))[:1] \
        == packs_before[:1]
    assert objects_in(mirror) - before == 4
    # The first ref still checks out (an older commit by id).
    task = agent.run_task("cat", "src/version.txt",
                          source={"git": str(bare), "ref": first_commit})
    assert agent.get(f"/task/{task['id']}/output").body == b"one\n"


def test_git_source_failures_end_the_task_with_gits_message(agent, tmp_path):
    bare, _ = make_repository(tmp_path)
    task = agent.run_task("true", source={"git": str(bare), "ref": "no-such-branch"})
    assert task["state"] == "failed"
    assert "no-such-branch" in task["reason"]
    task = agent.run_task("true", source={"git": str(tmp_path / "absent.git"), "ref": "main"})
    assert task["state"] == "failed"
    assert "git clone failed" in task["reason"], task["reason"]


def test_git_source_refuses_transport_helpers_and_option_refs(agent, tmp_path):
    for source, words in [({"git": "ext::sh -c touch% /tmp/pwned", "ref": "main"}, "ext::"),
                          ({"git": "file::/tmp/x", "ref": "main"}, "ext::"),
                          ({"git": "/tmp/x", "ref": "--upload-pack=touch"}, "'-'"),
                          ({"git": "/tmp/x"}, "REV")]:
        reply = agent.post("/execute", {"command": "true", "source": source})
        assert reply.status == 400, (source, reply)
        assert words in reply.json()["error"]["message"], reply.json()


def test_an_unused_mirror_is_pruned_past_git_cache(agent_factory, tmp_path):
    agent = agent_factory(extra_args=("--git-cache", "1"))
    first, _ = make_repository(tmp_path / "first")
    second, _ = make_repository(tmp_path / "second")
    task = agent.run_task("true", source={"git": str(first), "ref": "main"})
    assert task["state"] == "succeeded", task
    assert len(list((agent.state_dir / "git").iterdir())) == 1  # in use while it ran
    task = agent.run_task("true", source={"git": str(second), "ref": "main"})
    assert task["state"] == "succeeded", task
    # Over the 1-byte cap: the first repository's mirror (its task ended) goes; the
    # second's stays while its checkout and task use it.
    poll_until(lambda: len(list((agent.state_dir / "git").iterdir())) == 1, timeout=10,
               message="the first mirror pruned")
    assert agent.run_task("true", source={"git": str(first), "ref": "main"})["state"] \
        == "succeeded"  # cloned again when needed

"""Workspaces and artifacts on real agents: upload by content, run, collect, download."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from oxide_cluster.client import Node
from oxide_cluster.manifest import digest_bytes
from oxide_cluster.workspace_client import (
    BATCH_BLOB_MAX,
    download_artifacts,
    upload_workspace,
)
from tests.support import SECRET

JUNIT = (b'<?xml version="1.0"?><testsuite name="t" tests="3" failures="1" errors="0" '
         b'skipped="1" time="0.5"><testcase name="a"/></testsuite>')


def make_tree(root, files=20):
    (root / "a").mkdir(parents=True)
    (root / "a" / "b.txt").write_text("hello from the workspace\n")
    for index in range(files):
        (root / f"f{index}.txt").write_text(f"file {index}\n")
    (root / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "link").symlink_to("a/b.txt")


def test_workspace_task_runs_in_its_own_directory_and_sends_only_changes(agent, tmp_path):
    tree = tmp_path / "client-tree"
    make_tree(tree)
    node = Node(agent.url, SECRET)
    heard: list[tuple[int, int]] = []
    first = upload_workspace(node, tree, progress=lambda done, total: heard.append((done, total)))
    assert first.uploaded_blobs == first.files + 1  # every distinct file and the manifest
    # Progress after every request: growing, ending at the bytes sent, one total throughout.
    assert heard[-1] == (first.uploaded_bytes, first.uploaded_bytes)
    assert [done for done, _ in heard] == sorted({done for done, _ in heard})
    assert {total for _, total in heard} == {first.uploaded_bytes}
    task = agent.run_task("sh", "-c", "pwd; cat a/b.txt; cat link; ./run.sh",
                          workspace=first.digest)
    assert task["state"] == "succeeded", task
    out = agent.get(f"/task/{task['id']}/output").body.decode().splitlines()
    assert out[0] == str(agent.state_dir / "workspaces" / task["id"])
    assert out[0] != str(tree)
    assert out[1:] == ["hello from the workspace", "hello from the workspace", "ran"]
    assert not (agent.state_dir / "workspaces" / task["id"]).exists()  # removed after

    (tree / "a" / "b.txt").write_text("changed\n")
    second = upload_workspace(node, tree)
    assert second.digest != first.digest
    assert second.uploaded_blobs == 2  # the changed file and the new manifest
    assert second.uploaded_bytes == len(b"changed\n") + len(
        agent.get(f"/cas/{second.digest}").body)
    task = agent.run_task("cat", "b.txt", workspace=second.digest, cwd="a")
    assert agent.get(f"/task/{task['id']}/output").body == b"changed\n"


def test_missing_blobs_fail_the_task_naming_them(agent):
    digest = "ab" * 32
    task = agent.run_task("true", workspace=digest)
    assert task["state"] == "failed"
    assert digest in task["reason"] and "missing" in task["reason"]


def test_blob_digest_and_bad_requests_are_refused(agent):
    good = b"some bytes"
    wrong = "0" * 64
    reply = agent.request("PUT", f"/cas/{wrong}", raw=good)
    assert reply.status == 400 and reply.json()["error"]["code"] == "digest_mismatch"
    assert agent.post("/cas/missing", [wrong]).json() == {"missing": [wrong]}
    # Blob routes take 64 characters only: anything else is no route at all.
    assert agent.request("PUT", "/cas/not-a-digest", raw=good).status == 404
    assert agent.request("PUT", f"/cas/{wrong}", raw=good, secret=None).status == 401
    reply = agent.post("/execute", {"command": "true", "workspace": "0" * 64,
                                    "artifacts": ["../x"]})
    assert reply.status == 400 and "artifacts[0]" in reply.json()["error"]["message"]


def _requests(agent, route: str) -> dict[str, float]:
    """``oxide_http_requests`` of one route, by status, from the node's /metrics."""
    counts = {}
    for line in agent.get("/metrics").body.decode().splitlines():
        match = re.match(r'oxide_http_requests_total\{route="([^"]*)",status="(\d+)"\} (\S+)',
                         line)
        if match and match.group(1) == route:
            counts[match.group(2)] = float(match.group(3))
    return counts


def test_many_small_files_go_in_one_batch_and_large_ones_by_put(agent, tmp_path):
    tree = tmp_path / "many"
    tree.mkdir()
    for index in range(300):
        (tree / f"small{index}.txt").write_text(f"small file {index}\n")
    (tree / "large.bin").write_bytes(os.urandom(BATCH_BLOB_MAX + 1))
    node = Node(agent.url, SECRET)
    sent = upload_workspace(node, tree)
    assert sent.uploaded_blobs == 302  # 300 small, 1 large, the manifest
    assert _requests(agent, "/cas/batch") == {"200": 1.0}
    assert agent.post("/cas/missing", [sent.digest]).json() == {"missing": []}
    task = agent.run_task("sh", "-c", "cat small299.txt; wc -c < large.bin",
                          workspace=sent.digest)
    assert task["state"] == "succeeded", task
    assert agent.get(f"/task/{task['id']}/output").body.split() == [
        b"small", b"file", b"299", str(BATCH_BLOB_MAX + 1).encode()]


def test_a_batch_with_a_bad_frame_keeps_the_checked_frames_before_it(agent):
    good, bad = b"first blob", b"second blob"
    body = (f"{digest_bytes(good)} {len(good)}\n".encode() + good
            + f"{'0' * 64} {len(bad)}\n".encode() + bad)
    reply = agent.request("POST", "/cas/batch", raw=body)
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert error["code"] == "digest_mismatch" and "frame 2" in error["message"], error
    assert agent.post("/cas/missing", [digest_bytes(good), "0" * 64]).json() == {
        "missing": ["0" * 64]}
    reply = agent.request("POST", "/cas/batch", raw=b"not a frame header\n")
    assert reply.status == 400 and reply.json()["error"]["code"] == "bad_batch"
    truncated = f"{digest_bytes(bad)} 100\n".encode() + bad
    reply = agent.request("POST", "/cas/batch", raw=truncated)
    assert reply.status == 400 and "short" in reply.json()["error"]["message"]
    assert agent.request("POST", "/cas/batch", raw=b"", secret=None).status == 401


def test_a_queued_task_keeps_its_blobs_while_other_uploads_fill_the_cache(agent_factory,
                                                                           tmp_path):
    small = agent_factory(extra_args=("--max-tasks", "1", "--workspace-cache", "8000"))
    tree = tmp_path / "queued-tree"
    tree.mkdir()
    for index in range(3):
        (tree / f"part{index}.txt").write_bytes(bytes([65 + index]) * 1000)
    sent = upload_workspace(Node(small.url, SECRET), tree)
    gate = tmp_path / "gate"
    busy = small.post("/execute", {"command": "sh", "args": [
        "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done"]})
    assert busy.status in (200, 202), busy
    queued = small.post("/execute", {"command": "sh", "args": ["-c", "cat part*.txt | wc -c"],
                                     "workspace": sent.digest})
    assert queued.status == 202 and queued.json()["state"] == "queued", queued
    # Other uploads go past the cap: the least recently used blobs are the queued task's.
    for index in range(6):
        filler = bytes([97 + index]) * 1500
        reply = small.request("PUT", f"/cas/{digest_bytes(filler)}", raw=filler)
        assert reply.status == 201, reply.body
    assert small.post("/cas/missing", [sent.digest]).json() == {"missing": []}
    gate.touch()
    task = small.get(f"/task/{queued.json()['id']}?wait=30").json()
    assert task["state"] == "succeeded", task
    assert small.get(f"/task/{task['id']}/output").body.strip() == b"3000"


def test_blob_over_the_cache_size_is_413(agent_factory):
    small = agent_factory(extra_args=("--workspace-cache", "100"))
    data = b"x" * 200
    import hashlib

    reply = small.request("PUT", f"/cas/{hashlib.sha256(data).hexdigest()}", raw=data)
    assert reply.status == 413, reply


@pytest.fixture
def pair(meshed):
    return meshed(2)

def test_artifacts_from_another_node_and_blobs_fetched_from_a_peer(pair, tmp_path):
    a, b = pair
    b_id = b.get("/health").json()["node_id"]
    tree = tmp_path / "tree"
    make_tree(tree, files=3)
    uploaded = upload_workspace(Node(a.url, SECRET), tree)  # to a; the task runs on b
    script = ("mkdir -p reports; printf '%s' \"$JUNIT\" > reports/junit.xml; "
              "ln -s /etc/shadow shadow.xml; ln -s " + str(b.state_dir) + " state.xml; "
              "echo out > out.txt; exit 3")
    task = a.run_task("sh", "-c", script, workspace=uploaded.digest, node=b_id,
                      env={"JUNIT": JUNIT.decode()},
                      artifacts=["**/*.xml", "out.txt", "a/*.txt"])
    assert task["state"] == "failed" and task["exit_code"] == 3, task
    listing = a.get(f"/task/{task['id']}/artifacts").json()  # forwarded to b
    paths = {entry["path"] for entry in listing["artifacts"]}
    assert paths == {"reports/junit.xml", "out.txt", "a/b.txt"}
    skipped = {entry["path"]: entry["reason"] for entry in listing["skipped"]}
    assert set(skipped) == {"shadow.xml", "state.xml"}
    assert all("symlink" in reason for reason in skipped.values())
    assert a.get(f"/task/{task['id']}/artifacts/shadow.xml").status == 404
    out = tmp_path / "artifacts"
    written = download_artifacts(Node(a.url, SECRET), task["id"], out)
    assert sorted(p.relative_to(out).as_posix() for p in written) == sorted(paths)
    assert (out / "reports" / "junit.xml").read_bytes() == JUNIT
    assert (out / "a" / "b.txt").read_text() == "hello from the workspace\n"


def test_git_work_tree_sends_tracked_and_untracked_but_not_ignored(agent, tmp_path):
    tree = tmp_path / "repo"
    tree.mkdir()
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    (tree / ".gitignore").write_text("ignored.txt\n")
    (tree / "tracked.txt").write_text("t\n")
    (tree / "untracked.txt").write_text("u\n")
    (tree / "ignored.txt").write_text("i\n")
    subprocess.run(["git", "-C", str(tree), "add", "tracked.txt", ".gitignore"], check=True)
    uploaded = upload_workspace(Node(agent.url, SECRET), tree)
    task = agent.run_task("sh", "-c", "ls -A", workspace=uploaded.digest)
    listed = agent.get(f"/task/{task['id']}/output").body.decode().split()
    assert sorted(listed) == [".gitignore", "tracked.txt", "untracked.txt"]

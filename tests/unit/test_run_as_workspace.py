"""Workspaces for ``run_as`` tasks: the task's directory, and only it, is the user's."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from oxide_cluster.manifest import FileEntry, build_manifest, digest_bytes
from oxide_cluster.model import TaskState
from oxide_cluster.protection import User
from oxide_cluster.workspace import Workspaces, closed_to
from tests.unit.test_blob_integrity import task
from tests.unit.test_workspace_units import blob_store, outcome, put

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@pytest.fixture
def nobody() -> User:
    entry = pwd.getpwnam("nobody")
    return User("nobody", entry.pw_uid, entry.pw_gid)


@pytest.fixture
def open_dir():
    made = Path(tempfile.mkdtemp(prefix="oxide-run-as-"))
    made.chmod(0o711)
    yield made
    shutil.rmtree(made, ignore_errors=True)


def test_the_built_tree_is_the_users_and_the_cache_stays_the_agents(tmp_path, nobody,
                                                                    open_dir):
    store = blob_store(tmp_path, 10_000)
    content = b"data\n"
    tree = build_manifest([FileEntry("d/e/f.txt", 0o644, len(content), digest_bytes(content))])
    assert put(store, content) is True and put(store, tree.encode()) is True
    workspaces = Workspaces(Clock(), store, tmp_path / "state", artifact_limit=1000,
                            run_as=nobody, task_dir=open_dir / "tasks")
    workspaces.startService()
    ran = task(tree.digest())
    ran.artifacts = ["*.txt"]
    root = Path(outcome(workspaces.prepare(ran)))
    assert root == open_dir / "tasks" / "t1"
    assert stat.S_IMODE((open_dir / "tasks").stat().st_mode) == 0o711
    info = root.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (nobody.uid, 0o700)
    for path in (root / "d", root / "d" / "e", root / "d" / "e" / "f.txt"):
        assert path.stat().st_uid == nobody.uid, path
    blob = store.path(digest_bytes(content))
    assert blob.stat().st_uid == 0 and blob.stat().st_ino != (root / "d/e/f.txt").stat().st_ino
    # What a hard link to someone else's file looks like: not the user's, so not kept.
    (root / "stolen.txt").write_text("root's secret\n")
    made = root / "made.txt"
    made.write_text("the task's\n")
    os.chown(made, nobody.uid, nobody.gid)
    ran.state = TaskState.SUCCEEDED
    outcome(workspaces.finish(ran))
    listing = outcome(defer.Deferred.fromCoroutine(workspaces.listing("t1")))
    assert [entry["path"] for entry in listing.files] == ["made.txt"]
    assert listing.skipped[0]["path"] == "stolen.txt"
    assert "not owned by the run_as user nobody" in listing.skipped[0]["reason"]
    assert not root.exists() and list((open_dir / "tasks").iterdir()) == []


def test_closed_to_names_the_first_directory_the_user_cannot_enter(nobody, open_dir):
    inner = open_dir / "closed" / "inner"
    inner.mkdir(parents=True)
    (open_dir / "closed").chmod(0o700)
    assert closed_to(open_dir, nobody) is None
    assert closed_to(inner, nobody) == open_dir / "closed"

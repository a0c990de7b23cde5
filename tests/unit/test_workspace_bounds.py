"""Task directories kept after their task count in ``workspace_cache``; git mirrors are
pruned by size and age."""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.internet.task import Clock

from oxide_cluster.gitsource import GitMirrors
from oxide_cluster.manifest import FileEntry, build_manifest, digest_bytes
from oxide_cluster.model import Task, TaskState
from oxide_cluster.workspace import Workspaces
from tests.unit.test_workspace_units import blob_store, outcome, put


def rig(tmp_path, capacity, keep_failed=0.0):
    clock = Clock()
    blobs = blob_store(tmp_path, capacity)
    workspaces = Workspaces(clock, blobs, tmp_path / "state", artifact_limit=100,
                            keep_failed=keep_failed)
    workspaces.startService()
    return clock, blobs, workspaces


def prepared(workspaces, blobs, task_id, content):
    """A task whose tree is one file of ``content``, its directory built."""
    tree = build_manifest([FileEntry("f", 0o644, len(content), digest_bytes(content))])
    put(blobs, content)
    put(blobs, tree.encode())
    task = Task(id=task_id, node_id="n1", command="true", args=[], cwd=None, env={},
                secret_env_keys=[], labels={}, timeout=None, idle_timeout=None, retries=0,
                workspace=tree.digest())
    outcome(workspaces.prepare(task))
    return task


def run_task(workspaces, blobs, task_id, content, state=TaskState.SUCCEEDED):
    """Prepare and finish a task whose tree is one file of ``content``."""
    task = prepared(workspaces, blobs, task_id, content)
    task.state = state
    outcome(workspaces.finish(task))
    return task


def test_retained_trees_count_in_the_cache_and_make_way_for_a_blob(tmp_path):
    _, blobs, workspaces = rig(tmp_path, 2000)
    run_task(workspaces, blobs, "t1", b"a" * 200)
    run_task(workspaces, blobs, "t2", b"b" * 200)
    retained = workspaces.retained_root
    assert sorted(p.name for p in retained.iterdir()) == ["t1", "t2"]
    assert blobs.trees == 400
    # Unpinned blobs go first (LRU); then a blob that only fits without the retained
    # trees gets the room of the oldest one.
    assert put(blobs, b"z" * 1700) is True
    assert blobs.used + blobs.trees <= 2000 and not blobs.has(digest_bytes(b"a" * 200))
    assert sorted(p.name for p in retained.iterdir()) == ["t2"] and blobs.trees == 200


def test_a_tree_that_does_not_fit_beside_pinned_blobs_is_not_retained(tmp_path):
    _, blobs, workspaces = rig(tmp_path, 1000)
    put(blobs, b"p" * 500, pin=True)
    run_task(workspaces, blobs, "t1", b"a" * 300)  # 300 blob + 300 tree > 500 left
    assert list(workspaces.retained_root.iterdir()) == [] and blobs.trees == 0


def test_a_failed_tree_is_kept_for_its_time_counted_then_removed(tmp_path):
    clock, blobs, workspaces = rig(tmp_path, 1000, keep_failed=60.0)
    run_task(workspaces, blobs, "bad", b"f" * 100, TaskState.FAILED)
    kept = workspaces.directory("bad")
    assert (kept / "f").exists() and blobs.trees == 100
    clock.advance(60)
    assert not kept.exists() and blobs.trees == 0


def test_a_blob_cuts_the_keeping_of_a_failed_tree_short_when_nothing_else_can_go(tmp_path):
    _, blobs, workspaces = rig(tmp_path, 1000, keep_failed=3600.0)
    run_task(workspaces, blobs, "bad", b"f" * 300, TaskState.FAILED)
    put(blobs, b"p" * 300, pin=True)
    assert blobs.trees == 300
    assert put(blobs, b"n" * 500) is True  # fits only once the kept tree is gone
    assert not workspaces.directory("bad").exists() and blobs.trees == 0


def test_a_failed_tree_too_large_for_the_cache_is_removed_at_once(tmp_path):
    _, blobs, workspaces = rig(tmp_path, 700, keep_failed=3600.0)
    put(blobs, b"p" * 300, pin=True)
    run_task(workspaces, blobs, "bad", b"f" * 250, TaskState.FAILED)
    assert not workspaces.directory("bad").exists() and blobs.trees == 0


# -- git mirrors ---------------------------------------------------------------------


def mirror(root, name, size, last_used):
    path = root / name
    (path / "objects").mkdir(parents=True)
    (path / "objects" / "pack").write_bytes(b"x" * size)
    os.utime(path, (last_used, last_used))
    return path


def test_git_mirrors_past_their_age_or_the_size_cap_are_pruned_unless_in_use(tmp_path):
    root = tmp_path / "git"
    mirrors = GitMirrors(Clock(), root, limit=250, max_age=1000.0)
    in_use = "https://example.invalid/busy.git"
    now = 10_000.0
    mirror(root, "stale", 10, now - 2000)  # past max_age
    mirror(root, mirrors.mirror_path(in_use).name, 200, now - 5000)  # old but in use
    mirror(root, "older", 100, now - 500)  # least recently used of the rest
    mirror(root, "newer", 100, now - 100)
    mirror(root, "crashed.partial", 5, now - 50)
    mirrors._users[mirrors.mirror_path(in_use).name] = 1
    pruned = outcome(defer.Deferred.fromCoroutine(mirrors.prune(now)))
    assert pruned == ["stale", "older", "newer"]  # 200 in use + 5 left fit in 250
    assert sorted(p.name for p in root.iterdir()) == sorted([
        "crashed.partial", mirrors.mirror_path(in_use).name])
    mirrors.release(in_use)
    assert outcome(defer.Deferred.fromCoroutine(mirrors.prune(now))) == [
        mirrors.mirror_path(in_use).name]


class HeldWork:
    """An offload that runs work at once until ``hold``; then queues it for ``step``."""

    def __init__(self) -> None:
        self.hold = False
        self.queued: list[tuple[object, defer.Deferred]] = []

    def __call__(self, function):
        if not self.hold:
            return defer.maybeDeferred(function)
        waiting: defer.Deferred = defer.Deferred()
        self.queued.append((function, waiting))
        return waiting

    def step(self) -> None:
        function, waiting = self.queued.pop(0)
        waiting.callback(function())


def held_rig(tmp_path, capacity):
    from oxide_cluster.cas import BlobStore

    work = HeldWork()
    blobs = BlobStore(Clock(), tmp_path / "cas", capacity, offload=work)
    blobs.startService()
    workspaces = Workspaces(Clock(), blobs, tmp_path / "state", artifact_limit=100)
    workspaces.startService()
    return work, blobs, workspaces


def finished(workspaces, blobs, task_id, content, work):
    """A task run through prepare; its ``finish`` started with the work held."""
    task = prepared(workspaces, blobs, task_id, content)
    task.state = TaskState.SUCCEEDED
    work.hold = True
    return task, workspaces.finish(task)


def test_a_finished_tree_is_removed_after_the_end_is_announced_and_counted_till_gone(
        tmp_path, monkeypatch):
    monkeypatch.setattr("oxide_cluster.workspace.RETAINED_TREES", 0)
    work, blobs, workspaces = held_rig(tmp_path, 1000)
    _, ending = finished(workspaces, blobs, "t1", b"a" * 200, work)
    work.step()  # the rename out of the task's path
    assert outcome(ending) is None  # the end may be announced now
    assert not workspaces.directory("t1").exists()
    removing = workspaces.root / ".removing-t1"
    assert (removing / "f").exists() and blobs.trees == 200  # still on disk: counted
    while work.queued:
        work.step()
    assert not removing.exists() and blobs.trees == 0


def test_the_next_build_waits_for_a_finished_tree_being_measured_and_reuses_it(tmp_path):
    work, blobs, workspaces = held_rig(tmp_path, 2000)
    content = b"a" * 200
    _, ending = finished(workspaces, blobs, "t1", content, work)
    work.step()
    assert outcome(ending) is None and blobs.trees == 200  # measured after the end
    work.hold = False
    again = Task(id="t2", node_id="n1", command="true", args=[], cwd=None, env={},
                 secret_env_keys=[], labels={}, timeout=None, idle_timeout=None,
                 retries=0, workspace=build_manifest(
                     [FileEntry("f", 0o644, 200, digest_bytes(content))]).digest())
    preparing = workspaces.prepare(again)
    while work.queued:
        work.step()
    assert outcome(preparing) == str(workspaces.directory("t2"))
    assert workspaces.reused_files == 1  # t1's file kept, not copied again


def run_tree(workspaces, blobs, task_id, files):
    """Prepare and finish a task whose tree is ``files`` (path: content)."""
    for content in files.values():
        put(blobs, content)
    tree = build_manifest([FileEntry(path, 0o644, len(content), digest_bytes(content))
                           for path, content in files.items()])
    put(blobs, tree.encode())
    task = Task(id=task_id, node_id="n1", command="true", args=[], cwd=None, env={},
                secret_env_keys=[], labels={}, timeout=None, idle_timeout=None, retries=0,
                workspace=tree.digest())
    outcome(workspaces.prepare(task))
    outcome(workspaces.finish(task))


def test_the_next_tree_is_made_from_the_retained_one_sharing_most_files(tmp_path):
    _, blobs, workspaces = rig(tmp_path, 10_000)
    run_tree(workspaces, blobs, "t1", {"a": b"1", "b": b"2", "c": b"3"})
    run_tree(workspaces, blobs, "t2", {"a": b"other", "x": b"9"})  # nothing of t1's
    assert workspaces.reused_files == 0
    assert sorted(p.name for p in workspaces.retained_root.iterdir()) == ["t1", "t2"]
    run_tree(workspaces, blobs, "t3", {"a": b"1", "b": b"2", "x": b"9"})
    assert workspaces.reused_files == 2  # a and b from t1, not only x from t2
    assert sorted(p.name for p in workspaces.retained_root.iterdir()) == ["t2", "t3"]

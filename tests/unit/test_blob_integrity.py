"""The blob cache after a crash: flushed before acknowledged, leftovers swept, torn
blobs found out the first time a task needs them (cas.py, workspace.py)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from oxide_cluster import cas
from oxide_cluster.cas import BlobStore
from oxide_cluster.manifest import FileEntry, build_manifest, digest_bytes
from oxide_cluster.model import Task, TaskState
from oxide_cluster.workspace import WorkspaceError, Workspaces
from tests.unit.test_workspace_units import blob_store, offload, outcome, put

CONTENT = b"the bytes a task's tree needs\n" * 10


def task(workspace: str) -> Task:
    return Task(id="t1", node_id="n1", command="true", args=[], cwd=None, env={},
                secret_env_keys=[], labels={}, timeout=60.0, idle_timeout=None, retries=0,
                workspace=workspace)


def restarted(tmp_path: Path) -> BlobStore:
    """The same cache dir opened by a new agent (what a restart after a crash does)."""
    return blob_store(tmp_path, 10_000)


def a_workspace_written(tmp_path: Path) -> tuple[str, str]:
    store = blob_store(tmp_path, 10_000)
    tree = build_manifest([FileEntry("f.txt", 0o644, len(CONTENT), digest_bytes(CONTENT))])
    assert put(store, CONTENT) is True and put(store, tree.encode()) is True
    store.stopService()
    return tree.digest(), digest_bytes(CONTENT)


class OnePeer:
    """A peer holding the good bytes (PeerBlobs without the HTTP)."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.asked: list[str] = []

    async def fetch(self, store: BlobStore, digests: list[str]) -> list[str]:
        self.asked.extend(digests)
        for digest in digests:
            if digest in self.blobs:
                await store.put_bytes(digest, self.blobs[digest])
        return [digest for digest in digests if not store.has(digest)]


def workspaces_on(tmp_path: Path, store: BlobStore, source: OnePeer | None = None
                  ) -> Workspaces:
    workspaces = Workspaces(Clock(), store, tmp_path / "state", artifact_limit=1000,
                            source=source)
    workspaces.startService()
    return workspaces


def test_temp_leftovers_and_stray_files_are_removed_at_start(tmp_path):
    blob_store(tmp_path, 10_000).stopService()
    root = tmp_path / "cas"
    (root / "tmp" / "put-1-2").write_bytes(b"half a blob")
    stray = root / "ab" / ("ab" + "0" * 62 + ".tmp")
    stray.write_bytes(b"not a blob name")
    store = restarted(tmp_path)
    assert list((root / "tmp").iterdir()) == []
    assert not stray.exists()
    assert store.used == 0


def test_a_truncated_blob_found_at_start_fails_the_task_naming_the_reason(tmp_path):
    manifest, content = a_workspace_written(tmp_path)
    blob = tmp_path / "cas" / content[:2] / content
    os.chmod(blob, 0o644)
    blob.write_bytes(CONTENT[:7])  # what a power loss before the flush can leave
    store = restarted(tmp_path)
    assert store.has(content)  # trusted by name only until a task needs it
    workspaces = workspaces_on(tmp_path, store)
    failure = outcome(workspaces.prepare(task(manifest)))
    assert failure.check(WorkspaceError), failure
    reason = failure.getErrorMessage()
    assert content in reason and "no longer matched their digest" in reason, reason
    assert not store.has(content) and not blob.exists() and store.corrupt == 1
    assert not (tmp_path / "state" / "workspaces" / "t1").exists()


def test_a_corrupted_blob_is_fetched_again_from_a_peer_and_the_tree_is_right(tmp_path):
    manifest, content = a_workspace_written(tmp_path)
    blob = tmp_path / "cas" / content[:2] / content
    os.chmod(blob, 0o644)
    blob.write_bytes(b"X" + CONTENT[1:])  # same size, one byte flipped
    store = restarted(tmp_path)
    peer = OnePeer({content: CONTENT})
    workspaces = workspaces_on(tmp_path, store, peer)
    directory = outcome(workspaces.prepare(task(manifest)))
    assert (Path(directory) / "f.txt").read_bytes() == CONTENT
    assert peer.asked == [content]  # the manifest was sound: only the torn blob fetched
    assert blob.read_bytes() == CONTENT and store.corrupt == 1


def test_a_sound_blob_is_hashed_once_after_a_restart_and_trusted_after(tmp_path):
    manifest, content = a_workspace_written(tmp_path)
    store = restarted(tmp_path)
    assert outcome(defer.Deferred.fromCoroutine(store.verify([content, manifest]))) == []
    checked = []
    original = cas._matches
    try:
        cas._matches = lambda path, digest: checked.append(digest) or original(path, digest)
        assert outcome(defer.Deferred.fromCoroutine(store.verify([content]))) == []
    finally:
        cas._matches = original
    assert checked == []


def batch_body(blobs: list[bytes]) -> io.BytesIO:
    return io.BytesIO(b"".join(f"{digest_bytes(b)} {len(b)}\n".encode() + b for b in blobs))


def test_batches_are_flushed_once_by_the_uploads_manifest_put(tmp_path, monkeypatch):
    monkeypatch.setattr(cas, "FSYNC_MAX", 0)  # the syncfs path
    store = BlobStore(Clock(), tmp_path / "cas", 10_000, offload=offload)
    store.startService()
    blobs = [b"first blob", b"second blob", b"third blob"]
    named = []

    def record(path: Path) -> None:
        named.append(sorted(p.name for p in (tmp_path / "cas").glob("??/*")))

    monkeypatch.setattr(cas, "sync_filesystem", record)
    for part in (blobs[:2], blobs[2:]):
        result = outcome(defer.Deferred.fromCoroutine(store.put_batch(batch_body(part))))
        assert result.stored == len(part)
    assert named == []  # not a flush per batch step
    manifest = build_manifest([FileEntry(f"f{i}", 0o644, len(b), digest_bytes(b))
                               for i, b in enumerate(blobs)]).encode()
    assert put(store, manifest) is True
    # One flush of every batch blob, before the manifest's PUT is stored and answered.
    assert named == [sorted(digest_bytes(b) for b in blobs)]
    assert put(store, b"another single PUT") is True
    assert len(named) == 1  # nothing left to flush: fsync of that blob alone


def test_a_flush_that_fails_leaves_the_blobs_to_be_checked_before_use(tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(cas, "FSYNC_MAX", 0)
    store = BlobStore(Clock(), tmp_path / "cas", 10_000, offload=offload)
    store.startService()

    def full(path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cas, "sync_filesystem", full)
    data = b"written, never flushed"
    outcome(defer.Deferred.fromCoroutine(store.put_batch(batch_body([data]))))
    failure = outcome(defer.Deferred.fromCoroutine(store.put_bytes(
        digest_bytes(b"manifest"), b"manifest")))
    assert failure.value.code == "disk_full"
    assert not store.has(digest_bytes(b"manifest"))
    assert sorted(p.name for p in (tmp_path / "cas").glob("??/*")) == [digest_bytes(data)]
    monkeypatch.undo()
    checked = []
    original = cas._matches
    monkeypatch.setattr(cas, "_matches",
                        lambda path, digest: checked.append(digest) or original(path, digest))
    assert outcome(defer.Deferred.fromCoroutine(store.verify([digest_bytes(data)]))) == []
    assert checked == [digest_bytes(data)]  # in doubt: hashed before a task may use it
    assert list((tmp_path / "cas" / "tmp").iterdir()) == []


def test_a_few_unflushed_blobs_are_fsynced_one_by_one_not_the_whole_disk(tmp_path,
                                                                         monkeypatch):
    store = BlobStore(Clock(), tmp_path / "cas", 10_000, offload=offload)
    store.startService()
    monkeypatch.setattr(cas, "sync_filesystem", lambda path: pytest.fail("syncfs"))
    synced = []
    original = cas._fsync_files
    monkeypatch.setattr(cas, "_fsync_files",
                        lambda paths: synced.append([p.name for p in paths]) or original(paths))
    data = b"one changed file"
    outcome(defer.Deferred.fromCoroutine(store.put_batch(batch_body([data]))))
    assert put(store, b"its manifest") is True
    assert synced == [[digest_bytes(data)]] and store.flushes == 1


def test_a_task_flushes_uploaded_blobs_its_manifest_put_did_not(tmp_path, monkeypatch):
    monkeypatch.setattr(cas, "FSYNC_MAX", 0)  # the syncfs path
    store = blob_store(tmp_path, 10_000)
    tree = build_manifest([FileEntry("f.txt", 0o644, len(CONTENT), digest_bytes(CONTENT))])
    assert put(store, tree.encode()) is True  # the manifest was here already
    flushed = []
    monkeypatch.setattr(cas, "sync_filesystem", lambda path: flushed.append(
        sorted(p.name for p in (tmp_path / "cas").glob("??/*"))))
    outcome(defer.Deferred.fromCoroutine(store.put_batch(batch_body([CONTENT]))))
    assert flushed == []
    workspaces = workspaces_on(tmp_path, store)
    directory = outcome(workspaces.prepare(task(tree.digest())))
    assert (Path(directory) / "f.txt").read_bytes() == CONTENT
    assert flushed == [sorted([tree.digest(), digest_bytes(CONTENT)])]
    assert store.flushes == 1


def test_a_finished_workspace_task_state_is_untouched_by_verification(tmp_path):
    manifest, _ = a_workspace_written(tmp_path)
    store = restarted(tmp_path)
    workspaces = workspaces_on(tmp_path, store)
    ran = task(manifest)
    assert outcome(workspaces.prepare(ran)) == str(workspaces.directory("t1"))
    ran.state = TaskState.SUCCEEDED
    outcome(workspaces.finish(ran))
    assert store.corrupt == 0


def test_a_blob_stored_during_a_flush_is_left_for_the_next_one(tmp_path, monkeypatch):
    from tests.unit.test_workspace_bounds import HeldWork

    monkeypatch.setattr(cas, "FSYNC_MAX", 0)
    monkeypatch.setattr(cas, "sync_filesystem", lambda path: None)
    work = HeldWork()
    store = BlobStore(Clock(), tmp_path / "cas", 10_000, offload=work)
    store.startService()

    def batch(data: bytes) -> None:
        work.hold = False
        outcome(defer.Deferred.fromCoroutine(store.put_batch(batch_body([data]))))
        work.hold = True

    def flush(digests=None) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(store.flush(digests))

    batch(b"a")
    first = flush()  # its syncfs waits in the queue
    batch(b"b")
    second = flush()
    work.step()  # the first syncfs: it covered "a" only
    assert outcome(first) is None
    batch(b"c")  # stored while the second flush is under way
    work.step()
    assert outcome(second) is None and store.flushes == 2
    third = flush([digest_bytes(b"c")])  # "c" was in no flush yet: it gets one
    work.step()
    assert outcome(third) is None and store.flushes == 3

"""Manifests, the blob store's digests, LRU and pins, artifact globs and symlinks, JUnit."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from oxide_cluster.cas import BlobError, BlobStore
from oxide_cluster.manifest import (
    FileEntry,
    LinkEntry,
    Manifest,
    ManifestError,
    build_manifest,
    check_glob,
    digest_bytes,
    glob_regex,
    parse_manifest,
)
from oxide_cluster.model import TaskState, parse_task_request
from oxide_cluster.scheduler import Scheduler
from oxide_cluster.workspace import (
    PARALLEL_FROM,
    ArtifactListing,
    WorkspaceError,
    Workspaces,
    build_tree,
    match_artifacts,
    open_inside,
)
from oxide_cluster.workspace_client import WorkspaceError as ScanError
from oxide_cluster.workspace_client import junit_summary, scan_tree

D = "a" * 64


def manifest(*entries):
    return json.dumps({"version": 1, "entries": list(entries)}).encode()


def file(path, **extra):
    return {"type": "file", "path": path, "mode": 0o644, "size": 1, "digest": D, **extra}


def link(path, target):
    return {"type": "symlink", "path": path, "target": target}


@pytest.mark.parametrize(("raw", "reason"), [
    (manifest(file("/etc/passwd")), "is absolute"),
    (manifest(file("a/../../x")), "contains '..'"),
    (manifest(file("a//b")), "not normalised"),
    (manifest(file("./a")), "not normalised"),
    (manifest(file("a"), file("a")), "duplicate path"),
    (manifest(file("a"), file("a/b")), "its parent 'a' is a file"),
    (manifest(file("dev", mode=0o020644)), "names a device"),
    (manifest(file("pipe", mode=0o010644)), "names a FIFO"),
    (manifest({"type": "fifo", "path": "p"}), "names a fifo"),
    (manifest(file("suid", mode=0o4755)), "not a plain file mode"),
    (manifest(file("a", digest="xyz")), "digest must be 64"),
    (manifest(file("a", digest=D + "\n")), "digest must be 64"),
    (manifest(file("a", size=-1)), "size must be"),
    (manifest(file("a", size=True)), "size must be"),
    (manifest(file("a", mode=True)), "mode must be"),
    (manifest(file("a", extra=1)), "unknown field 'extra'"),
    (manifest(link("l", "a") | {"mode": 1}), "unknown field 'mode'"),
    (manifest(file("a/b/x"), file("a/b/y"), file("a")), "its parent 'a' is a file"),
    (manifest(file("d/e/x"), link("d", "."), file("d/f")), "under the symlink 'd'"),
    (manifest(file("a" * 1030 + "\u00e9" * 1600)), "longer than 4096 bytes"),
    (manifest(link("l", "/etc/shadow")), "is absolute"),
    (manifest(link("l", "../outside")), "escapes the tree"),
    (manifest(link("d/l", "../../x")), "escapes the tree"),
    # each target stays inside lexically, but x is the root, so x/.. is its parent
    (manifest(link("x", "."), link("y", "x/..")), "escapes the tree"),
    (manifest(link("l1", "l2"), link("l2", "l1")), "symlink loop"),
    (manifest(link("l", "d"), file("l/f")), "under the symlink 'l'"),
    (json.dumps({"version": 2, "entries": []}).encode(), "version 2 is not supported"),
    (b"[", "not JSON"),
])
def test_bad_manifests_are_refused_with_the_reason(raw, reason):
    with pytest.raises(ManifestError, match=reason.replace("(", r"\(")):
        parse_manifest(raw)


def test_manifest_round_trip_is_canonical_and_keeps_inside_symlinks():
    built = build_manifest([FileEntry("b", 0o700, 1, D), FileEntry("a/x", 0o600, 2, D)],
                           [LinkEntry("a/l", "../b")])
    assert [entry.path for entry in built.files] == ["a/x", "b"]
    assert built.files[1].mode == 0o755 and built.files[0].mode == 0o644
    assert parse_manifest(built.encode()) == built
    assert built.digest() == digest_bytes(built.encode())


def test_a_built_manifest_keeps_the_canonical_bytes_sort_keys_would_give():
    files = [FileEntry(f"d{index % 3}/f{index}\u00e9\"", 0o100644 if index % 2 else 0o755,
                       index, D) for index in range(20)]
    files.append(FileEntry("d1/t\tab\\\udcff\u2028", 0o644, 0, D))  # escaped by json
    links = [LinkEntry("d1/l", "f1\u00e9\""), LinkEntry("a", "d2")]
    built = build_manifest(files, links)
    fresh = Manifest(built.files, built.links)  # encoded again, nothing kept
    assert built == fresh and built.encode() == fresh.encode()
    assert built.encode() == json.dumps(json.loads(built.encode()), sort_keys=True,
                                        separators=(",", ":")).encode()
    assert parse_manifest(built.encode()) == built


@pytest.mark.parametrize(("files", "links", "reason"), [
    ([FileEntry("/etc/passwd", 0o644, 1, D)], [], "is absolute"),
    ([FileEntry("a/../x", 0o644, 1, D)], [], "contains '..'"),
    ([FileEntry("a//x", 0o644, 1, D)], [], "not normalised"),
    ([FileEntry("a", 0o644, 1, D), FileEntry("a", 0o644, 2, D)], [], "duplicate path"),
    ([FileEntry("a", 0o644, 1, D)], [LinkEntry("a", "b")], "duplicate path"),
    ([FileEntry("a", 0o644, 1, D), FileEntry("a/b", 0o644, 1, D)], [], "parent 'a' is a file"),
    ([FileEntry("a", 0o4755, 1, D)], [], "not a plain file mode"),
    ([FileEntry("a", 0o644, -1, D)], [], "size must be"),
    ([FileEntry("a", 0o644, 1, "A" * 64)], [], "digest must be 64"),
    ([], [LinkEntry("l", "../x")], "escapes the tree"),
    ([], [LinkEntry("l", "/etc")], "is absolute"),
    ([FileEntry("l/f", 0o644, 1, D)], [LinkEntry("l", "d")], "under the symlink 'l'"),
])
def test_a_client_manifest_is_refused_as_the_node_would(files, links, reason):
    with pytest.raises(ManifestError, match=reason):
        build_manifest(files, links)
    entries = [{"type": "file", "path": f.path, "mode": f.mode, "size": f.size,
                "digest": f.digest} for f in files]
    with pytest.raises(ManifestError, match=reason):
        parse_manifest(manifest(*entries, *(link(lk.path, lk.target) for lk in links)))


def test_a_scan_refuses_a_symlink_out_of_the_tree_naming_it(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "out").symlink_to("../elsewhere")
    with pytest.raises(ScanError, match=r"symlink 'out' .*escapes the tree.*--exclude"):
        scan_tree(tree, use_cache=False)


def test_a_scan_enters_directories_and_sends_symlinks_as_they_are(tmp_path):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "skip" / "deep").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_bytes(b"f")
    (tree / "a" / "g.log").write_bytes(b"g")
    (tree / "skip" / "deep" / "h").write_bytes(b"h")
    (tree / "top").write_bytes(b"t")
    (tree / "a" / "to-dir").symlink_to("b")
    (tree / "dangling").symlink_to("a/nothing")
    (tree / "empty").mkdir()
    scanned = scan_tree(tree, excludes=["skip", "*.log"], use_cache=False)
    assert [(f.path, f.digest) for f in scanned.manifest.files] == [
        ("a/b/f", digest_bytes(b"f")), ("top", digest_bytes(b"t"))]
    assert [(link.path, link.target) for link in scanned.manifest.links] == [
        ("a/to-dir", "b"), ("dangling", "a/nothing")]


@pytest.mark.parametrize("pattern", ["../x", "a/../../x", "/etc/shadow", "~/x", ""])
def test_escaping_artifact_globs_are_refused(pattern):
    with pytest.raises(ManifestError):
        check_glob(pattern)


def test_glob_semantics():
    assert glob_regex("**/*.xml").match("junit.xml")
    assert glob_regex("**/*.xml").match("a/b/junit.xml")
    assert not glob_regex("*.xml").match("a/junit.xml")
    assert glob_regex("reports/**").match("reports/a/b")
    assert glob_regex("r[0-9].txt").match("r1.txt") and not glob_regex("r[0-9].txt").match("rx.txt")


def offload(function):
    return defer.maybeDeferred(function)


def blob_store(tmp_path: Path, capacity: int) -> BlobStore:
    store = BlobStore(Clock(), tmp_path / "cas", capacity, offload=offload)
    store.startService()
    return store


def outcome(deferred):
    """The result or Failure of a Deferred that has fired (the blob store runs inline
    here), consumed so no "unhandled error" is logged."""
    box = []
    deferred.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


def put(store, data: bytes, pin=False):
    return outcome(defer.Deferred.fromCoroutine(store.put_bytes(digest_bytes(data), data,
                                                                pin)))


def test_a_blob_whose_bytes_do_not_match_is_refused_and_not_kept(tmp_path):
    store = blob_store(tmp_path, 1000)
    failure = outcome(defer.Deferred.fromCoroutine(store.put_bytes("0" * 64, b"data")))
    assert isinstance(failure.value, BlobError) and failure.value.status == 400
    failure.trap(BlobError)
    assert not store.has("0" * 64) and not store.path("0" * 64).exists()
    assert list((tmp_path / "cas" / "tmp").iterdir()) == []
    failure = outcome(defer.Deferred.fromCoroutine(store.put_bytes("xyz", b"data")))
    failure.trap(BlobError)
    assert failure.value.code == "bad_digest"


def test_lru_eviction_spares_pinned_and_recently_used_blobs(tmp_path):
    store = blob_store(tmp_path, 30)
    a, b, c, d = (bytes([65 + i]) * 10 for i in range(4))
    for data in (a, b, c):
        assert put(store, data) is True
    store.pin([digest_bytes(a)])          # a queued task needs a
    store.missing([digest_bytes(b)])      # a client was just told b is here
    assert put(store, d) is True                  # over the cap: c is the LRU unpinned one
    assert [store.has(digest_bytes(x)) for x in (a, b, c, d)] == [True, True, False, True]
    assert not store.path(digest_bytes(c)).exists()
    assert store.used == 30 and store.evicted == 1


def test_a_blob_that_cannot_fit_beside_pinned_ones_is_refused(tmp_path):
    store = blob_store(tmp_path, 20)
    a, b, c = (bytes([65 + i]) * 10 for i in range(3))
    assert put(store, a, pin=True) is True
    assert put(store, b, pin=True) is True
    failure = put(store, c)
    failure.trap(BlobError)
    assert failure.value.status == 507 and not store.has(digest_bytes(c))
    store.unpin([digest_bytes(a)])
    assert put(store, c) is True and not store.has(digest_bytes(a))


def frames(*blobs: bytes) -> io.BytesIO:
    return io.BytesIO(b"".join(f"{digest_bytes(b)} {len(b)}\n".encode() + b for b in blobs))


def test_a_batch_stores_each_frame_checked_in_steps(tmp_path, monkeypatch):
    monkeypatch.setattr("oxide_cluster.cas.BATCH_STEP_BLOBS", 2)  # several thread steps
    store = blob_store(tmp_path, 1000)
    blobs = [bytes([65 + i]) * (i + 1) for i in range(5)]
    assert put(store, blobs[0]) is True
    result = outcome(defer.Deferred.fromCoroutine(store.put_batch(frames(*blobs))))
    assert (result.stored, result.present, result.size) == (4, 1, 15)
    assert all(store.path(digest_bytes(b)).read_bytes() == b for b in blobs)
    assert store.used == 15


def test_a_batch_over_the_room_left_by_pinned_blobs_stops_at_the_frame_that_does_not_fit(
        tmp_path):
    store = blob_store(tmp_path, 25)
    assert put(store, b"p" * 10, pin=True) is True
    # a fits; b evicts a; c cannot fit; d (written in the same step) must not be left
    batch = frames(b"a" * 10, b"b" * 10, b"c" * 10, b"d")
    store.pin([digest_bytes(b"b" * 10)])  # a queued task needs b before it arrives
    failure = outcome(defer.Deferred.fromCoroutine(store.put_batch(batch)))
    failure.trap(BlobError)
    assert failure.value.status == 507 and "the 2 before it were kept" in str(failure.value)
    assert store.has(digest_bytes(b"b" * 10)) and not store.has(digest_bytes(b"c" * 10))
    on_disk = {path.name for path in (tmp_path / "cas").glob("??/*")}
    assert on_disk == {digest_bytes(b"p" * 10), digest_bytes(b"b" * 10)}


def test_oversized_blob_is_413(tmp_path):
    store = blob_store(tmp_path, 5)
    failure = put(store, b"123456")
    failure.trap(BlobError)
    assert failure.value.status == 413


def test_store_reindexes_blobs_on_restart(tmp_path):
    store = blob_store(tmp_path, 100)
    assert put(store, b"kept") is True
    again = blob_store(tmp_path, 100)
    assert again.has(digest_bytes(b"kept")) and again.used == 4


def test_planted_symlinks_are_not_artifacts(tmp_path):
    root = tmp_path / "task"
    (root / "reports").mkdir(parents=True)
    (root / "reports" / "ok.xml").write_text("<testsuite/>")
    (root / "junit.xml").symlink_to("/etc/shadow")
    (root / "state").symlink_to(tmp_path)  # a directory symlink: never entered
    (tmp_path / "secret.xml").write_text("secret")
    os.mkfifo(root / "fifo.xml")
    found, skipped = match_artifacts(root, ["**/*.xml", "state", "state/**"])
    assert found == ["reports/ok.xml"]
    reasons = {item.path: item.reason for item in skipped}
    assert set(reasons) == {"junit.xml", "fifo.xml", "state"}
    assert "symlink" in reasons["junit.xml"] and "regular" in reasons["fifo.xml"]
    with pytest.raises(OSError):
        open_inside(root, "junit.xml")
    with pytest.raises(OSError):
        open_inside(root, "state/secret.xml")  # through a symlinked directory
    with open_inside(root, "reports/ok.xml") as handle:
        assert handle.read() == b"<testsuite/>"


def test_build_tree_copies_files_so_a_task_cannot_write_into_the_cache(tmp_path):
    store = blob_store(tmp_path, 100)
    assert put(store, b"original") is True
    built = build_manifest([FileEntry("x", 0o644, 8, digest_bytes(b"original"))],
                           [LinkEntry("l", "x")])
    root = tmp_path / "ws"
    build_tree(built, store.path, root)
    (root / "x").write_bytes(b"changed!")
    assert store.path(digest_bytes(b"original")).read_bytes() == b"original"
    assert os.readlink(root / "l") == "x"


def test_a_large_tree_is_copied_by_two_threads_with_modes_and_a_failure_in_either(tmp_path):
    store = blob_store(tmp_path, 100_000)
    entries = []
    for index in range(PARALLEL_FROM + 11):
        data = f"file {index}".encode()
        put(store, data)
        entries.append(FileEntry(f"d{index % 3}/f{index}", 0o755 if index % 2 else 0o644,
                                 len(data), digest_bytes(data)))
    built = build_tree(build_manifest(entries, []), store.path, tmp_path / "ws")
    for entry in entries:
        path = tmp_path / "ws" / entry.path
        assert path.read_bytes() == store.path(entry.digest).read_bytes()
        assert path.stat().st_mode & 0o777 == entry.mode
        assert built.files[entry.path][0] == path.stat().st_ino
    # A blob gone from the cache, copied by the second thread (odd index): refused, and
    # nothing of the half-built tree is left.
    store.path(entries[1].digest).unlink()
    with pytest.raises(WorkspaceError, match="cannot build the workspace"):
        build_tree(build_manifest(entries, []), store.path, tmp_path / "ws2")
    assert not (tmp_path / "ws2").exists()


def test_junit_summary_counts_and_refuses_doctype():
    report = (b'<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1" '
              b'time="1.5"/><testsuite time="0.5"><testcase/><testcase><failure/>'
              b'</testcase></testsuite></testsuites>')
    summary = junit_summary(report)
    assert summary is not None
    assert (summary.tests, summary.failures, summary.errors, summary.skipped,
            summary.time) == (6, 2, 1, 1, 2.0)
    assert "6 tests, 2 failures" in summary.line()
    bomb = (b'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY a "aaaa">]>'
            b'<testsuite tests="1">&a;</testsuite>')
    assert junit_summary(bomb) is None
    assert junit_summary(b"not xml") is None and junit_summary(b"<html/>") is None


# -- queued tasks pin their workspace blobs (scheduler → Workspaces.hold/release) ------


def queued_rig(tmp_path: Path, capacity: int):
    """A one-slot scheduler (fake executor) whose queue pins through real Workspaces."""
    from tests.unit.test_scheduler import MemoryStore, SlotExecutor

    class WorkspaceExecutor(SlotExecutor):
        def new_task(self, request, **kwargs):
            made = super().new_task(request, **kwargs)
            made.workspace = request.workspace
            return made

    clock = Clock()
    store = MemoryStore()
    blobs = blob_store(tmp_path, capacity)
    workspaces = Workspaces(clock, blobs, tmp_path / "state", artifact_limit=100)
    workspaces.startService()
    executor = WorkspaceExecutor(clock, 1, store)
    scheduler = Scheduler(clock, store, executor, default_queue_timeout=100.0,
                          pins=workspaces)
    scheduler.startService()
    defer.Deferred.fromCoroutine(scheduler.recover())
    return scheduler, executor, blobs, workspaces


def submit(scheduler: Scheduler, command: str, **fields):
    request = parse_task_request({"command": command, **fields}, 3600)
    return outcome(defer.Deferred.fromCoroutine(scheduler.submit(request)))


def test_a_queued_task_pins_its_manifest_and_files_until_it_leaves_the_queue(tmp_path):
    scheduler, _, blobs, _ = queued_rig(tmp_path, 300)
    content = b"w" * 20
    tree = build_manifest([FileEntry("f.txt", 0o644, len(content), digest_bytes(content))])
    raw = tree.encode()
    assert put(blobs, content) is True and put(blobs, raw) is True
    submit(scheduler, "busy")
    queued = submit(scheduler, "needs-tree", workspace=tree.digest())
    assert queued.state is TaskState.QUEUED
    assert blobs.pinned(digest_bytes(content)) and blobs.pinned(tree.digest())
    # Other clients fill the cache: the queued task's blobs are the least recently used,
    # yet never the victims; the newer unpinned blob goes instead.
    room = 300 - len(content) - len(raw)
    assert put(blobs, b"x" * room) is True
    assert put(blobs, b"y" * 10) is True
    assert blobs.has(digest_bytes(content)) and blobs.has(tree.digest())
    assert not blobs.has(digest_bytes(b"x" * room))
    scheduler.cancel(queued.id)  # leaves the queue: its blobs may go now
    assert not blobs.pinned(digest_bytes(content)) and not blobs.pinned(tree.digest())
    assert put(blobs, b"z" * (300 - 10)) is True
    assert not blobs.has(digest_bytes(content)) and not blobs.has(tree.digest())


def test_prepare_takes_over_the_pins_a_queued_task_held(tmp_path):
    scheduler, _, blobs, workspaces = queued_rig(tmp_path, 1000)
    content = b"kept"
    tree = build_manifest([FileEntry("f.txt", 0o644, len(content), digest_bytes(content))])
    assert put(blobs, content) is True and put(blobs, tree.encode()) is True
    submit(scheduler, "busy")
    queued = submit(scheduler, "needs-tree", workspace=tree.digest())
    prepared = outcome(workspaces.prepare(queued))  # what the executor does at start
    assert prepared == str(workspaces.directory(queued.id))
    workspaces.release(queued.id)  # the scheduler's release after start: a no-op now
    assert blobs.pinned(digest_bytes(content)) and blobs.pinned(tree.digest())
    queued.state = TaskState.SUCCEEDED
    outcome(workspaces.finish(queued))
    assert not blobs.pinned(digest_bytes(content)) and not blobs.pinned(tree.digest())


def test_forgetting_a_pruned_task_unpins_its_artifacts_and_removes_its_listing(tmp_path):
    blobs = blob_store(tmp_path, 1000)
    listings = tmp_path / "state" / "artifacts"
    listings.mkdir(parents=True)
    kept, other = b"k" * 10, b"o" * 10
    for data in (kept, other):
        assert put(blobs, data, pin=True) is True
    for task_id, data in (("pruned", kept), ("alive", other)):
        listing = ArtifactListing(task_id, [{"path": "a", "size": 10,
                                             "sha256": digest_bytes(data)}])
        (listings / f"{task_id}.json").write_text(json.dumps(listing.to_json()))
    workspaces = Workspaces(Clock(), blobs, tmp_path / "state", artifact_limit=100)
    outcome(defer.Deferred.fromCoroutine(workspaces.forget(["pruned", "never-had-any"])))
    assert not blobs.pinned(digest_bytes(kept)) and blobs.pinned(digest_bytes(other))
    assert not (listings / "pruned.json").exists() and (listings / "alive.json").exists()


def test_kept_artifacts_are_pinned_again_when_the_agent_starts(tmp_path):
    blobs = blob_store(tmp_path, 1000)
    listings = tmp_path / "state" / "artifacts"
    listings.mkdir(parents=True)
    kept = b"r" * 10
    assert put(blobs, kept) is True and not blobs.pinned(digest_bytes(kept))
    listing = ArtifactListing("t1", [{"path": "junit.xml", "size": 10,
                                      "sha256": digest_bytes(kept)}])
    (listings / "t1.json").write_text(json.dumps(listing.to_json()))
    workspaces = Workspaces(Clock(), blobs, tmp_path / "state", artifact_limit=100)
    workspaces.startService()
    assert blobs.pinned(digest_bytes(kept))

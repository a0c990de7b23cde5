"""Second runs: a retained task tree rebuilt by difference, and the client digest cache."""

from __future__ import annotations

import os
from pathlib import Path

from oxide_cluster.manifest import FileEntry, LinkEntry, build_manifest, digest_bytes
from oxide_cluster.workspace import _tree_size, build_tree, reuse_tree
from oxide_cluster.workspace_client import DigestCache, scan_tree
from tests.unit.test_workspace_units import blob_store, put


def entry(path: str, data: bytes, mode: int = 0o644) -> FileEntry:
    return FileEntry(path, mode, len(data), digest_bytes(data))


def test_reuse_copies_only_changed_files_and_sets_right_what_the_task_did(tmp_path):
    store = blob_store(tmp_path, 10_000)
    for data in (b"same", b"old", b"new", b"edited", b"gone"):
        put(store, data)
    first = build_manifest([entry("a/same", b"same"), entry("a/changes", b"old"),
                            entry("b/touched", b"edited"), entry("c/gone", b"gone")],
                           [LinkEntry("l", "a/same")])
    root = tmp_path / "ws"
    built = build_tree(first, store.path, root)
    # What a task may leave behind: an edit in place, a new file, a planted symlink
    # where a kept file's directory was, a FIFO.
    (root / "b" / "touched").write_bytes(b"EDITED")
    (root / "a" / "extra").write_bytes(b"x")
    os.mkfifo(root / "fifo")
    os.rename(root / "c", root / "c-moved")
    os.symlink("/etc", root / "c")
    second = build_manifest([entry("a/same", b"same"), entry("a/changes", b"new"),
                             entry("b/touched", b"edited"), entry("c/gone", b"gone")],
                            [LinkEntry("l", "a/same")])
    same_inode = os.lstat(root / "a" / "same").st_ino
    rebuilt = reuse_tree(built, second, store.path, root)
    assert rebuilt.reused == 1  # only a/same was kept
    assert os.lstat(root / "a" / "same").st_ino == same_inode
    assert (root / "a" / "changes").read_bytes() == b"new"
    assert (root / "b" / "touched").read_bytes() == b"edited"
    assert not (root / "c").is_symlink() and (root / "c" / "gone").read_bytes() == b"gone"
    assert sorted(os.listdir(root)) == ["a", "b", "c", "l"]
    assert sorted(os.listdir(root / "a")) == ["changes", "same"]
    assert os.readlink(root / "l") == "a/same"
    assert store.path(digest_bytes(b"edited")).read_bytes() == b"edited"


def test_reuse_does_not_keep_a_chmodded_or_hard_linked_file(tmp_path):
    store = blob_store(tmp_path, 10_000)
    put(store, b"one")
    put(store, b"two")
    tree = build_manifest([entry("one", b"one"), entry("two", b"two")])
    root = tmp_path / "ws"
    built = build_tree(tree, store.path, root)
    os.chmod(root / "one", 0o755)
    os.link(root / "two", tmp_path / "outside")
    rebuilt = reuse_tree(built, tree, store.path, root)
    assert rebuilt.reused == 0
    assert os.stat(root / "one").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "outside").st_nlink == 1  # a fresh copy, not the linked one


def test_digest_cache_hashes_only_changed_files(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    tree.mkdir()
    for index in range(5):
        (tree / f"f{index}").write_bytes(b"x" * index)
    old = os.stat(tree / "f0").st_mtime_ns - 10**10
    for index in range(5):
        os.utime(tree / f"f{index}", ns=(old, old))
    # ctime is always "just now" here; the racy window has its own test below.
    monkeypatch.setattr("oxide_cluster.workspace_client.RACY_NS", 0)
    cache_dir = tmp_path / "cache"
    first = scan_tree(tree, cache_dir=cache_dir)
    (tree / "f3").write_bytes(b"yyy")  # same size, new ctime
    os.utime(tree / "f3", ns=(old, old))  # same mtime too: ctime still tells
    cache = DigestCache(tree.resolve(), cache_dir)
    hashed = []
    monkeypatch.setattr("oxide_cluster.workspace_client._file_digest",
                        lambda path: hashed.append(Path(path).name)
                        or digest_bytes(Path(path).read_bytes()))
    second = scan_tree(tree, cache_dir=cache_dir)
    assert cache.path.exists()
    assert hashed == ["f3"]
    digests = {f.path: f.digest for f in second.manifest.files}
    assert digests["f3"] == digest_bytes(b"yyy")
    assert first.manifest.digest() != second.manifest.digest()


def test_digest_cache_does_not_trust_a_file_changed_just_now(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "fresh").write_bytes(b"new")
    cache = DigestCache(tree, tmp_path / "cache")
    cache.digest("fresh", tree / "fresh", os.stat(tree / "fresh"))
    cache.save(tree)
    assert not cache.path.exists() or "fresh" not in cache.path.read_text()


def test_a_corrupt_digest_cache_is_ignored(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"data")
    cache = DigestCache(tree.resolve(), tmp_path / "cache")
    cache.path.parent.mkdir(parents=True)
    cache.path.write_text("{not json")
    scanned = scan_tree(tree, cache_dir=tmp_path / "cache")
    assert scanned.manifest.files[0].digest == digest_bytes(b"data")
    assert Path(cache.path).exists()


def test_reuse_copies_a_file_whose_mode_changed_in_the_manifest(tmp_path):
    store = blob_store(tmp_path, 10_000)
    put(store, b"run")
    put(store, b"kept")
    first = build_manifest([entry("d/run", b"run"), entry("d/kept", b"kept")])
    root = tmp_path / "ws"
    built = build_tree(first, store.path, root)
    second = build_manifest([entry("d/run", b"run", 0o755), entry("d/kept", b"kept")])
    rebuilt = reuse_tree(built, second, store.path, root)
    assert rebuilt.reused == 1 and "d/kept" in rebuilt.files
    assert os.stat(root / "d" / "run").st_mode & 0o777 == 0o755


def test_a_tree_is_measured_by_its_regular_files_without_following_symlinks(tmp_path):
    root = tmp_path / "ws"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"x" * 10)
    (root / "g").write_bytes(b"y" * 5)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "big").write_bytes(b"z" * 1000)
    (root / "to-outside").symlink_to(tmp_path / "outside")
    (root / "to-big").symlink_to(tmp_path / "outside" / "big")
    (root / "closed").mkdir(mode=0)  # unreadable (not as root): skipped, not an error
    assert _tree_size(root) == 15

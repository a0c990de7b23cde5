"""Per-task workspaces built from the blob cache, and the artifacts a task leaves.

A task with a ``workspace`` (a manifest digest) gets a fresh directory
``<state_dir>/workspaces/<task id>``. Files are *copied* from the cache (a reflink where
the filesystem offers one, else an in-kernel ``sendfile``), never hard-linked: the task
runs as the agent's own user, so it could ``chmod u+w`` a hard-linked file and write
through the shared inode into the cache,
corrupting the blob for every later task. Blobs the node lacks are fetched from peers
that have them; a task whose blobs nobody has fails naming them.

With ``run_as`` (the agent is root, tasks run as another user), task directories are
made under ``task_dir`` instead (root's, 0711: the user may enter a directory whose name
it knows, not list them), because the state dir is 0700. Once built, everything in the
task's directory is handed to the user (deepest first, the directory itself last, 0700):
the user owns its copies, never a cache inode, and nothing of the state dir.

After the task ends, whatever its state, files matching its ``artifacts`` globs are
stored in the cache with the task (pinned, so never evicted) and listed in
``<state_dir>/artifacts/<task id>.json``. Paths are opened one directory at a time with
``O_NOFOLLOW`` below the task directory: a symlink planted by the task (to
``/etc/shadow``, to the agent's state) is skipped with a reason, never followed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from oxide_cluster.cas import BlobError, BlobStore
from oxide_cluster.forwarding import PeerClient, PeerUnavailable
from oxide_cluster.gitsource import GitMirrors, SourceError
from oxide_cluster.manifest import (
    FileEntry,
    Manifest,
    ManifestError,
    check_relative_path,
    glob_regex,
    parse_manifest,
)
from oxide_cluster.model import Task, TaskState
from oxide_cluster.protection import User

_FICLONE = 0x40049409  # linux/fs.h: share the source's extents, copy on write
MAX_LISTED_MISSING = 5
# Finished task directories kept per node to build later trees from (see reuse_tree).
RETAINED_TREES = 2
PARALLEL_FROM = 64  # files; a tree this large is copied by two threads


class WorkspaceError(Exception):
    """The workspace cannot be made; the message is the task's reason."""


class BlobSource(Protocol):
    """Where a node gets blobs it lacks (its peers)."""

    async def fetch(self, store: BlobStore, digests: list[str]) -> list[str]:
        """Fetch what peers have into ``store``; the digests still missing after."""


# -- building a tree (blocking: runs off the reactor thread) --------------------------


class _Copier:
    """Copies blobs into a tree: a reflink where the filesystem offers one, else an
    in-kernel ``sendfile``. After the first refused reflink it stops asking (one failed
    ioctl per file is a syscall each of thousands of files)."""

    def __init__(self) -> None:
        self.reflink = True

    def copy(self, source: str | Path, target: str | Path, mode: int) -> os.stat_result:
        """Write ``target`` (which must not exist) with ``source``'s bytes and ``mode``;
        its stat as the task will find it."""
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                          | os.O_NOFOLLOW, 0o600)
            try:
                self._fill(src, dst)
                os.fchmod(dst, mode)
                return os.fstat(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _fill(self, src: int, dst: int) -> None:
        if self.reflink:
            try:
                fcntl.ioctl(dst, _FICLONE, src)
                return
            except OSError:
                self.reflink = False  # not a reflink filesystem (ext4, tmpfs)
        size, offset = os.fstat(src).st_size, 0
        while offset < size:
            sent = os.sendfile(dst, src, offset, size - offset)
            if not sent:
                break
            offset += sent


# What a file of a built tree looked like when the agent wrote it: (inode, size,
# mtime_ns, ctime_ns, mode). Any write, chmod, rename over or re-link by a task changes
# ctime (which no unprivileged process can set back) or the inode.
FileStat = tuple[int, int, int, int, int]
BlobPath = Callable[[str], "str | Path"]  # a digest's file in the cache (BlobStore.file)


@attrs.define
class BuiltTree:
    """A task directory as the agent left it before the task ran."""

    manifest: Manifest
    files: dict[str, FileStat]
    dir_mode: int
    reused: int = 0  # files kept from an earlier task's tree rather than copied


def _file_stat(info: os.stat_result) -> FileStat:
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_mode)


def _workspace_error(error: OSError) -> WorkspaceError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return WorkspaceError(f"disk full while building the workspace ({error.strerror})")
    return WorkspaceError(f"cannot build the workspace: {error}")


def _place_files(manifest: Manifest, blob_path: BlobPath, root: Path,
                 keep: dict[str, FileStat]) -> BuiltTree:
    """Copy every manifest file not in ``keep`` into ``root``, add the symlinks, and
    return what was made."""
    made: set[str] = set()
    files: dict[str, FileStat] = {}
    todo = []
    for entry in manifest.files:
        if entry.path in keep:
            files[entry.path] = keep[entry.path]
            continue
        parent = os.path.dirname(entry.path)
        if parent and parent not in made:
            (root / parent).mkdir(parents=True, exist_ok=True)
            made.add(parent)
        todo.append(entry)
    copier = _Copier()
    prefix = f"{root}/"  # strings, not Paths: the threads share the GIL for thousands

    def place(entries: Sequence[FileEntry]) -> None:
        for entry in entries:
            info = copier.copy(blob_path(entry.digest), prefix + entry.path, entry.mode)
            files[entry.path] = _file_stat(info)

    # Two threads: the copies are in the kernel, the per-file calls release the GIL.
    helper = threading.Thread(target=place, args=(todo[1::2],), name="oxide-tree")
    failed: list[BaseException] = []
    helper.run = partial(_catching, helper.run, failed)  # type: ignore[method-assign]
    if len(todo) >= PARALLEL_FROM:
        helper.start()
        try:
            place(todo[0::2])
        finally:
            helper.join()
        if failed:
            raise failed[0]
    else:
        place(todo)
    for link in manifest.links:
        parent = os.path.dirname(link.path)
        if parent:
            (root / parent).mkdir(parents=True, exist_ok=True)
        os.symlink(link.target, root / link.path)
    return BuiltTree(manifest, files, os.lstat(root).st_mode, len(keep))


def _catching(run: Callable[[], None], failed: list[BaseException]) -> None:
    try:
        run()
    except BaseException as error:  # re-raised by the thread that waits for it
        failed.append(error)


def build_tree(manifest: Manifest, blob_path: BlobPath, root: Path
               ) -> BuiltTree:
    """Create ``root`` (which must not exist) holding the manifest's files and symlinks.

    Raises WorkspaceError on a full disk (after removing what was made)."""
    try:
        root.mkdir(mode=0o755)
        return _place_files(manifest, blob_path, root, {})
    except OSError as error:
        remove_tree(root)
        raise _workspace_error(error) from None


def reuse_tree(old: BuiltTree, manifest: Manifest, blob_path: BlobPath,
               root: Path) -> BuiltTree:
    """Turn ``root``, an earlier task's directory built from ``old``, into ``manifest``'s
    tree, copying only what differs.

    A file is kept only if the manifests agree on its digest and mode and it still has
    the inode, size, mtime, ctime and mode the agent gave it, with no second hard link.
    Everything else the task left (new or changed files, symlinks, FIFOs, directories
    the manifest does not need) is removed first, so nothing is written through a
    symlink. Raises OSError if the tree cannot be set right (the caller rebuilds)."""
    before = {entry.path: entry for entry in old.manifest.files}
    # What each file the manifests agree on (digest, mode) must still look like.
    same: dict[str, FileStat] = {}
    dirs = {"."}
    for entry in manifest.files:
        earlier = before.get(entry.path)
        if earlier is not None and earlier.digest == entry.digest \
                and earlier.mode == entry.mode and entry.path in old.files:
            same[entry.path] = old.files[entry.path]
    for path in [entry.path for entry in manifest.files] + [link.path for link in
                                                           manifest.links]:
        parent = path.rpartition("/")[0]  # checked normalised paths: their dirname
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    if os.lstat(root).st_mode != old.dir_mode:
        raise OSError(errno.EPERM, "the task changed its directory's mode")
    keep: dict[str, FileStat] = {}

    def sweep(directory: str) -> None:
        prefix = "" if directory == "." else directory + "/"
        with os.scandir(f"{root}/{directory}") as entries:
            listed = list(entries)
        for item in listed:
            relative = prefix + item.name
            info = item.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                if relative in dirs and info.st_mode & 0o700 == 0o700:
                    sweep(relative)
                else:
                    remove_tree(Path(item.path))
                continue
            expected = same.get(relative)
            if expected is not None and stat.S_ISREG(info.st_mode) and info.st_nlink == 1 \
                    and expected == (info.st_ino, info.st_size, info.st_mtime_ns,
                                     info.st_ctime_ns, info.st_mode):
                keep[relative] = expected
            else:
                os.unlink(item.path)

    sweep(".")
    return _place_files(manifest, blob_path, root, keep)


def hand_over(root: Path, user: User) -> None:
    """Give ``root``'s tree to ``user``: each entry chowned (symlinks themselves) before
    the directory holding it, so no directory is the user's while the agent still
    changes anything inside it; ``root`` last, made 0700."""
    for directory, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.chown(os.path.join(directory, name), user.uid, user.gid,
                     follow_symlinks=False)
    os.chmod(root, 0o700)
    os.chown(root, user.uid, user.gid, follow_symlinks=False)


def closed_to(path: Path, user: User) -> Path | None:
    """The first of ``path`` and its ancestors ``user`` may not search, or None."""
    groups = {user.gid, *(os.getgrouplist(user.name, user.gid))}
    for directory in [path, *path.parents][::-1]:
        info = os.stat(directory)
        if info.st_uid == user.uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return directory
    return None


def _tree_size(root: Path) -> int:
    """Bytes of the regular files under ``root`` (symlinks not followed). ``scandir``'s
    entry types pick the files to ``stat`` and the directories to enter."""
    total = 0
    pending = [str(root)]
    while pending:
        try:
            listed = os.scandir(pending.pop())
        except OSError:
            continue
        with listed:
            for item in listed:
                try:
                    if item.is_dir(follow_symlinks=False):
                        pending.append(item.path)
                    elif item.is_file(follow_symlinks=False):
                        total += item.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    return total


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        remove_tree(path)


def remove_tree(root: Path) -> None:
    """Remove a task directory, even one whose directories the task made read-only."""
    def retry_writable(function: Any, path: str, _: Any) -> None:
        try:
            os.chmod(os.path.dirname(path), 0o700)
            if function is os.rmdir or function is os.unlink:
                function(path)
            elif os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass

    if root.is_symlink():
        root.unlink()
    elif root.exists():
        shutil.rmtree(root, onerror=retry_writable)


# -- artifacts (blocking) ------------------------------------------------------------


@attrs.frozen
class Skipped:
    path: str
    reason: str


def match_artifacts(root: Path, globs: Sequence[str]) -> tuple[list[str], list[Skipped]]:
    """Relative paths of regular files under ``root`` matching any glob, and what
    matched but is refused (symlinks, devices, FIFOs). Symlinked directories are not
    entered."""
    patterns = [glob_regex(pattern) for pattern in globs]
    found: list[str] = []
    skipped: list[Skipped] = []
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        relative_dir = os.path.relpath(directory, root)
        prefix = "" if relative_dir == "." else relative_dir + "/"
        for name in sorted(filenames) + [d for d in dirnames
                                         if os.path.islink(os.path.join(directory, d))]:
            relative = prefix + name
            if not any(pattern.match(relative) for pattern in patterns):
                continue
            info = os.lstat(os.path.join(directory, name))
            if stat.S_ISLNK(info.st_mode):
                skipped.append(Skipped(relative, "is a symlink; only regular files inside "
                                                 "the task directory are artifacts"))
            elif not stat.S_ISREG(info.st_mode):
                skipped.append(Skipped(relative, "is not a regular file"))
            else:
                found.append(relative)
    return sorted(found), skipped


def open_inside(root: Path, relative: str) -> BinaryIO:
    """Open ``root/relative`` for reading without following any symlink on the way
    (a component swapped for a symlink after the walk is refused with ELOOP/ENOTDIR)."""
    check_relative_path(relative)
    parts = relative.split("/")
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                            dir_fd=directory)
            os.close(directory)
            directory = inner
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                     dir_fd=directory)
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


@attrs.define
class ArtifactListing:
    """What ``GET /task/{id}/artifacts`` answers."""

    task_id: str
    files: list[dict[str, Any]] = attrs.Factory(list)
    skipped: list[dict[str, str]] = attrs.Factory(list)
    cut: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task_id, "artifacts": self.files, "skipped": self.skipped,
                "cut": self.cut}

    def find(self, path: str) -> dict[str, Any] | None:
        for entry in self.files:
            if entry["path"] == path:
                return entry
        return None


def _write_json(path: Path, body: dict[str, Any]) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(body, separators=(",", ":")))
    os.replace(temp, path)


def _read_listings(directory: Path) -> list[dict[str, Any]]:
    listings = []
    for path in directory.glob("*.json"):
        try:
            listings.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return listings


# -- the service ---------------------------------------------------------------------


class Workspaces(service.Service):
    """Prepares a task's directory before it runs and collects its artifacts after."""

    log = Logger()

    def __init__(self, reactor: Any, blobs: BlobStore, state_dir: Path, *,
                 artifact_limit: int, keep_failed: float = 0.0,
                 source: BlobSource | None = None, git_cache: int = 2 * 1024 ** 3,
                 git_cache_age: float = 30 * 86400.0, run_as: User | None = None,
                 task_dir: Path | None = None) -> None:
        self._reactor = reactor
        self.blobs = blobs
        self.run_as = run_as
        if task_dir is None:
            task_dir = state_dir / "workspaces" if run_as is None \
                else state_dir.with_name(state_dir.name + "-tasks")
        self.root = task_dir
        self._closed: str | None = None  # why the run_as user cannot reach self.root
        self.listings = state_dir / "artifacts"
        self.artifact_limit = artifact_limit
        self.keep_failed = keep_failed
        self.source = source
        self._pins: dict[str, list[str]] = {}
        self._held: dict[str, list[str]] = {}  # queued tasks (scheduler), not started
        self._preparing: dict[str, defer.Deferred[str]] = {}
        self._kept: dict[str, Any] = {}
        self.retained_root = state_dir / "workspaces-retained"
        self._built: dict[str, BuiltTree] = {}
        # Finished task directories kept to build the next tree from, oldest first.
        self._retained: list[tuple[Path, BuiltTree]] = []
        # Finished tasks' directories being measured or removed (see _retire).
        self._settling: set[defer.Deferred[None]] = set()
        self._removing: set[defer.Deferred[None]] = set()
        # Bytes of each retained or kept-after-failure directory (in blobs.trees).
        self._tree_bytes: dict[Path, int] = {}
        self._git_users: dict[str, str] = {}  # task id: the URL its checkout borrows from
        blobs.reclaim = self._reclaim
        self.git = GitMirrors(reactor, state_dir / "git", limit=git_cache,
                              max_age=git_cache_age, offload=blobs.run)
        self.reused_files = 0  # files kept rather than copied, since start (tests, bench)
        self.ready: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        self.ready = defer.Deferred.fromCoroutine(self._start())
        self.ready.addErrback(lambda failure: self.log.failure(
            "cannot prepare the workspace directories", failure))

    async def _start(self) -> None:
        def sweep() -> list[dict[str, Any]]:
            # Task directories of an earlier agent run: their tasks are lost already.
            remove_tree(self.root)
            remove_tree(self.retained_root)
            self.root.mkdir(parents=True, exist_ok=True)
            if self.run_as is not None:
                self._open_task_dir()
            self.retained_root.mkdir(parents=True, exist_ok=True)
            self.listings.mkdir(parents=True, exist_ok=True)
            return _read_listings(self.listings)

        await self.blobs.loaded
        for listing in await self.blobs.run(sweep):
            self.blobs.pin(entry["sha256"] for entry in listing.get("artifacts", []))

    def _open_task_dir(self) -> None:
        """``task_dir`` for run_as tasks: the agent's own, 0711, reachable by the user."""
        assert self.run_as is not None
        info = os.lstat(self.root)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise OSError(errno.EPERM, f"task_dir {self.root} is not a directory of the "
                                       "agent's own (made by someone else?)")
        os.chmod(self.root, 0o711)
        closed = closed_to(self.root, self.run_as)
        if closed is not None:
            self._closed = (f"run_as user {self.run_as.name} cannot enter {closed}, so "
                            f"not its task directory under task_dir {self.root}; open it "
                            "(o+x) or set task_dir elsewhere")
            self.log.error("{reason}", reason=self._closed)

    def stopService(self) -> None:
        super().stopService()
        for call in self._kept.values():
            if call.active():
                call.cancel()

    def directory(self, task_id: str) -> Path:
        return self.root / task_id

    # -- while the task waits in the scheduler's queue -----------------------------

    def hold(self, task: Task) -> None:
        """Pin a queued task's manifest now and, once read, the blobs it lists, so the
        cache never evicts what the task will need. ``prepare`` takes the pins over."""
        if task.workspace is None or task.id in self._held:
            return
        held = self._held[task.id] = [task.workspace]
        self.blobs.pin(held)
        reading = defer.Deferred.fromCoroutine(self._hold_listed(task.id, task.workspace))
        reading.addErrback(lambda failure: self.log.failure(
            "cannot pin the blobs of queued task {task_id}", failure, task_id=task.id))

    async def _hold_listed(self, task_id: str, digest: str) -> None:
        await self.blobs.loaded
        if not self.blobs.has(digest):
            return  # not here yet: fetched from peers when the task starts
        raw = await self.blobs.run(lambda: self.blobs.path(digest).read_bytes())
        try:
            wanted = sorted(parse_manifest(raw).digests())
        except ManifestError:
            return  # refused with the reason when the task starts
        held = self._held.get(task_id)
        if held is not None:  # still queued (not started, not cancelled)
            self.blobs.pin(wanted)
            held.extend(wanted)

    def release(self, task_id: str) -> None:
        """A queued task left the queue without starting (cancelled, expired)."""
        self.blobs.unpin(self._held.pop(task_id, []))

    # -- before the task ----------------------------------------------------------

    def prepare(self, task: Task) -> defer.Deferred[str]:
        """Fires with the directory the task runs in (its workspace root, or ``cwd``
        within it); fails with WorkspaceError giving the reason."""
        preparing = defer.Deferred.fromCoroutine(self._prepare(task))
        self._preparing[task.id] = preparing
        return preparing

    async def _prepare(self, task: Task) -> str:
        if task.source is not None:
            root = self.directory(task.id)
            try:
                await self.ready
                self._check_reachable()
                await self.git.checkout(task.source["git"], task.source["ref"], root,
                                        private=self.run_as is not None)
                self._git_users[task.id] = task.source["git"]
                await self._hand_over(root)
            except (SourceError, WorkspaceError) as error:
                await self.blobs.run(lambda: remove_tree(root))
                raise WorkspaceError(str(error)) from None
            return str(root / task.cwd) if task.cwd else str(root)
        assert task.workspace is not None
        pins = self._pins.setdefault(task.id, [])
        pins.extend(self._held.pop(task.id, []))  # what it held while queued
        await self.ready
        self._check_reachable()
        digest = task.workspace
        self.blobs.pin([digest])
        pins.append(digest)
        await self._fetch([digest])
        await self._verify([digest])
        try:  # read and parsed off the reactor thread: thousands of entries
            manifest = await self.blobs.run(
                lambda: parse_manifest(self.blobs.path(digest).read_bytes()))
        except ManifestError as error:
            raise WorkspaceError(f"workspace manifest {digest} is refused: {error}") from None
        if manifest.total_size > self.blobs.capacity:
            raise WorkspaceError(f"workspace of {manifest.total_size} bytes is larger than "
                                 f"workspace_cache ({self.blobs.capacity} bytes)")
        wanted = sorted(manifest.digests())
        self.blobs.pin(wanted)
        pins.extend(wanted)
        await self._fetch(wanted)
        try:  # uploaded blobs the manifest's PUT did not flush (it was here already)
            await self.blobs.flush(wanted)
        except BlobError as error:
            raise WorkspaceError(f"cannot flush the workspace's blobs: {error.message}") \
                from None
        await self._verify(wanted)
        root = self.directory(task.id)
        self._built[task.id] = await self._build(manifest, root)
        await self._hand_over(root)
        return str(root / task.cwd) if task.cwd else str(root)

    def _check_reachable(self) -> None:
        if self._closed is not None:
            raise WorkspaceError(self._closed)

    async def _hand_over(self, root: Path) -> None:
        """With run_as, the built directory becomes the user's (see ``hand_over``)."""
        user = self.run_as
        if user is None:
            return
        try:
            await self.blobs.run(lambda: hand_over(root, user))
        except OSError as error:
            await self.blobs.run(lambda: remove_tree(root))
            raise WorkspaceError(f"cannot hand the workspace to run_as user "
                                 f"{user.name}: {error}") from None

    async def _build(self, manifest: Manifest, root: Path) -> BuiltTree:
        """From the retained tree sharing most files with ``manifest``, else afresh."""
        if self._settling:  # a just-finished tree may be about to be retained
            await defer.DeferredList(list(self._settling))
        wanted = {entry.path: entry.digest for entry in manifest.files}  # no tuple a file
        best, shared = None, 0
        for index, (_, built) in enumerate(self._retained):
            overlap = sum(wanted.get(entry.path) == entry.digest
                          for entry in built.manifest.files)
            if overlap > shared:
                best, shared = index, overlap
        if best is None:
            return await self.blobs.run(lambda: build_tree(manifest, self.blobs.file, root))
        retained, old = self._retained.pop(best)
        self._uncount(retained)  # the task's own directory now, not a kept one

        def rebuild() -> BuiltTree:
            try:
                os.rename(retained, root)
                return reuse_tree(old, manifest, self.blobs.file, root)
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    remove_tree(root)
                    raise _workspace_error(error) from None
                self.log.info("rebuilding a workspace from scratch: {error}", error=error)
                remove_tree(retained)
                remove_tree(root)
                return build_tree(manifest, self.blobs.file, root)

        built = await self.blobs.run(rebuild)
        self.reused_files += built.reused
        return built

    async def _fetch(self, digests: list[str], corrupt: Sequence[str] = ()) -> None:
        missing = self.blobs.missing(digests)
        if missing and self.source is not None:
            missing = await self.source.fetch(self.blobs, missing)
        if missing:
            shown = ", ".join(missing[:MAX_LISTED_MISSING])
            more = f" and {len(missing) - MAX_LISTED_MISSING} more" \
                if len(missing) > MAX_LISTED_MISSING else ""
            torn = sum(digest in corrupt for digest in missing)
            why = f"; {torn} of them dropped here because their bytes no longer matched " \
                  "their digest (a crash tore them)" if torn else ""
            raise WorkspaceError(f"workspace blobs missing on this node and its peers: "
                                 f"{shown}{more} ({len(missing)} in all{why})")

    async def _verify(self, digests: list[str]) -> None:
        """Blobs found in the cache at start are hashed the first time a task needs
        them; a torn one is dropped and fetched again from a peer (verified on arrival)."""
        corrupt = await self.blobs.verify(digests)
        if corrupt:
            await self._fetch(corrupt, corrupt)

    # -- after the task -----------------------------------------------------------

    def finish(self, task: Task) -> defer.Deferred[None]:
        """Collect artifacts, then remove the directory (or keep a failed one a while)."""
        return defer.Deferred.fromCoroutine(self._finish(task))

    async def _finish(self, task: Task) -> None:
        preparing = self._preparing.pop(task.id, None)
        if preparing is not None:  # a task cancelled while its tree was being built
            try:
                await preparing
            except Exception:
                pass
        root = self.directory(task.id)
        borrowed = self._git_users.pop(task.id, None)
        if borrowed is not None:
            self.git.release(borrowed)  # its mirror may be pruned now
        try:
            if task.artifacts:
                listing = await self._collect(task, root)
                if listing.cut:
                    task.reason = f"{task.reason}; {listing.cut}"
        finally:
            self.blobs.unpin(self._pins.pop(task.id, []))
            built = self._built.pop(task.id, None)
            if self.keep_failed > 0 and task.state is not TaskState.SUCCEEDED:
                await self._keep_failed(task.id, root)
            else:
                await self._retire(task.id, root, built)

    # -- directories kept after their task, counted in workspace_cache ---------------

    def _count(self, path: Path, size: int) -> None:
        self._tree_bytes[path] = size
        self.blobs.trees += size

    def _uncount(self, path: Path) -> None:
        self.blobs.trees -= self._tree_bytes.pop(path, 0)

    def _drop_retained(self, fits: Callable[[], bool], keep: int) -> list[Path]:
        """Oldest retained trees out of the count until ``fits()`` and at most ``keep``
        are left; their paths, to remove."""
        dropped = []
        while self._retained and (len(self._retained) > keep or not fits()):
            path, _ = self._retained.pop(0)
            self._uncount(path)
            dropped.append(path)
        return dropped

    def _reclaim(self, fits: Callable[[], bool]) -> defer.Deferred[None]:
        """For the blob store: a blob needs room only kept trees hold. Retained trees go
        first, then directories kept after a failure (their debugging time cut short)."""
        dropped = self._drop_retained(fits, RETAINED_TREES)
        while self._kept and not fits():
            task_id = next(iter(self._kept))
            call = self._kept.pop(task_id)
            if call.active():
                call.cancel()
            path = self.directory(task_id)
            self._uncount(path)
            dropped.append(path)
            self.log.info("removing the kept directory of failed task {task_id} early: "
                          "workspace_cache needs the room", task_id=task_id)
        return self.blobs.run(partial(_remove_all, dropped))

    async def _keep_failed(self, task_id: str, root: Path) -> None:
        """Keep a failed task's directory ``keep_failed`` seconds if it fits in
        workspace_cache beside the blobs (retained trees make way), else remove it."""
        size = await self.blobs.run(partial(_tree_size, root))
        dropped = self._drop_retained(lambda: self.blobs.fits(size), RETAINED_TREES)
        fits = self.blobs.fits(size)
        if fits:
            self._count(root, size)
            self._kept[task_id] = self._reactor.callLater(
                self.keep_failed, self._remove_kept, task_id)
        else:
            dropped.append(root)
            self.log.info("not keeping the directory of failed task {task_id}: its "
                          "{size} bytes do not fit in workspace_cache", task_id=task_id,
                          size=size)
        await self.blobs.run(partial(_remove_all, dropped))

    async def _retire(self, task_id: str, root: Path, built: BuiltTree | None) -> None:
        """Keep the directory of a finished task to build the next tree from (up to
        RETAINED_TREES of them, counted in workspace_cache), else remove it.

        Only a rename happens before the task's end is announced; measuring a kept
        tree or removing one (thousands of files) goes on after it, the tree counted in
        workspace_cache by its manifest's size meanwhile; the next ``_build`` waits
        for a tree being measured (it may be the one to reuse), not for removals."""
        # Not under run_as: the user owned those files, and a process of its that
        # outlived the task could still change one after it is judged unchanged.
        keep = built is not None and RETAINED_TREES > 0 and self.running \
            and self.run_as is None
        target = self.retained_root / task_id if keep \
            else self.root / f".removing-{task_id}"  # same filesystem: a rename

        def move() -> bool:
            try:
                os.rename(root, target)
            except FileNotFoundError:
                return False
            except OSError:
                remove_tree(root)
                return False
            return True

        if not await self.blobs.run(move):
            return
        self._count(target, built.manifest.total_size if built is not None else 0)
        settling = defer.Deferred.fromCoroutine(self._settle(target, built if keep else None))
        pending = self._settling if keep else self._removing
        pending.add(settling)

        def settled(result: object) -> None:
            pending.discard(settling)
            if isinstance(result, Failure):
                self.log.failure("cannot keep or remove {path}", result, path=target)

        settling.addBoth(settled)

    async def _settle(self, target: Path, built: BuiltTree | None) -> None:
        """After the task's end: remove ``target`` (``built`` None), or measure it and
        keep it as a retained tree if it fits."""
        if built is None:
            try:
                await self.blobs.run(lambda: remove_tree(target))
            finally:
                self._uncount(target)
            return
        try:
            size = await self.blobs.run(partial(_tree_size, target))
        finally:
            self._uncount(target)
        dropped = self._drop_retained(lambda: self.blobs.fits(size), RETAINED_TREES - 1)
        if self.blobs.fits(size):
            self._retained.append((target, built))
            self._count(target, size)
        else:
            dropped.append(target)
        if dropped:
            await self.blobs.run(partial(_remove_all, dropped))

    def _remove_kept(self, task_id: str) -> None:
        self._kept.pop(task_id, None)
        root = self.directory(task_id)
        self._uncount(root)
        self.blobs.run(lambda: remove_tree(root)).addErrback(
            lambda failure: self.log.failure("cannot remove {root}", failure, root=root))

    async def _collect(self, task: Task, root: Path) -> ArtifactListing:
        listing = ArtifactListing(task.id)
        exists = await self.blobs.run(root.is_dir)
        if exists:
            found, skipped = await self.blobs.run(
                lambda: match_artifacts(root, task.artifacts or []))
            listing.skipped = [attrs.asdict(item) for item in skipped]
            room, cut = self.artifact_limit, []
            for relative in found:
                try:
                    handle = await self.blobs.run(partial(open_inside, root, relative))
                except (OSError, ManifestError) as error:
                    listing.skipped.append({"path": relative,
                                            "reason": f"not opened: {error}"})
                    continue
                try:
                    info = os.fstat(handle.fileno())
                    size = info.st_size
                    if self.run_as is not None and info.st_uid != self.run_as.uid:
                        # The task can only have made it by linking another's file.
                        listing.skipped.append({
                            "path": relative,
                            "reason": f"not owned by the run_as user {self.run_as.name}; "
                                      "only files the task owns are artifacts"})
                        continue
                    if size > room:
                        cut.append(relative)
                        continue
                    digest, size = await self.blobs.put_stream(handle, pin=True,
                                                                durable=False)
                except BlobError as error:
                    listing.skipped.append({"path": relative, "reason": error.message})
                    continue
                finally:
                    handle.close()
                room -= size
                listing.files.append({"path": relative, "size": size, "sha256": digest})
            if cut:
                listing.cut = (f"artifact_limit of {self.artifact_limit} bytes reached: "
                               f"{len(cut)} artifact(s) not kept, first {cut[0]!r}")
        if listing.files:
            await self.blobs.sync()  # one flush for all of them, before they are listed
        body = listing.to_json()
        await self.blobs.run(lambda: _write_json(self.listings / f"{task.id}.json", body))
        return listing

    async def forget(self, task_ids: list[str]) -> None:
        """Tasks deleted by retention: unpin their artifacts (the cache may evict them
        now) and remove their listings."""
        paths = [self.listings / f"{task_id}.json" for task_id in task_ids]

        def read_and_remove() -> list[str]:
            digests: list[str] = []
            for path in paths:
                try:
                    body = json.loads(path.read_text())
                except (FileNotFoundError, ValueError):
                    continue
                # ArtifactListing.to_json writes the files under "artifacts".
                digests.extend(entry["sha256"] for entry in body.get("artifacts", []))
                path.unlink(missing_ok=True)
            return digests

        self.blobs.unpin(await self.blobs.run(read_and_remove))

    async def listing(self, task_id: str) -> ArtifactListing | None:
        """The artifacts recorded for a task, or None if it kept none."""
        path = self.listings / f"{task_id}.json"

        def read() -> dict[str, Any] | None:
            try:
                result: dict[str, Any] = json.loads(path.read_text())
                return result
            except FileNotFoundError:
                return None

        body = await self.blobs.run(read)
        if body is None:
            return None
        return ArtifactListing(body["task"], body["artifacts"], body["skipped"], body["cut"])


class PeerBlobs:
    """Blobs from peers, node to node with the cluster secret: ask each healthy peer
    which of the wanted digests it lacks (``POST /cas/missing``), fetch the others
    (``GET /cas/{digest}``, checked against the digest on arrival)."""

    log = Logger()
    BATCH = 5000
    PARALLEL = 8

    def __init__(self, peers: PeerClient, healthy: Callable[[], list[str]]) -> None:
        self._peers = peers
        self._healthy = healthy

    async def fetch(self, store: BlobStore, digests: list[str]) -> list[str]:
        wanted = list(digests)
        for node_id in self._healthy():
            if not wanted:
                break
            try:
                lacking: set[str] = set()
                for start in range(0, len(wanted), self.BATCH):
                    reply = await self._peers.request(
                        node_id, b"POST", b"/cas/missing",
                        json.dumps(wanted[start:start + self.BATCH]).encode(),
                        {b"Content-Type": b"application/json"})
                    if reply.status != 200:
                        raise PeerUnavailable(f"node {node_id} answered {reply.status}")
                    lacking.update(json.loads(reply.body)["missing"])
            except (PeerUnavailable, ValueError, KeyError) as error:
                self.log.warn("cannot ask {node_id} for blobs: {error}", node_id=node_id,
                              error=error)
                continue
            gate = defer.DeferredSemaphore(self.PARALLEL)
            await defer.DeferredList(
                [gate.run(self._get, node_id, store, digest)
                 for digest in wanted if digest not in lacking], consumeErrors=True)
            wanted = [digest for digest in wanted if not store.has(digest)]
        return wanted

    async def _get(self, node_id: str, store: BlobStore, digest: str) -> None:
        # Spooled to a file in the store's temp dir as it arrives, then checked and
        # stored like an upload: a large blob is never held in memory.
        with tempfile.TemporaryFile(dir=store.root / "tmp", prefix="peer-") as spool:
            try:
                status = await self._peers.download(node_id, b"/cas/" + digest.encode(),
                                                    spool, timeout=300)
                if status == 200:
                    spool.seek(0)
                    # Not flushed: torn by a crash, it is found out and fetched again.
                    await store.put_file(digest, spool, durable=False)
            except (PeerUnavailable, BlobError) as error:
                self.log.warn("blob {digest} from {node_id}: {error}", digest=digest,
                              node_id=node_id, error=error)

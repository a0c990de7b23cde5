"""Client side of workspaces: send a tree by content, bring artifacts back, read JUnit.

Blocking and standard library only, like ``oxide_cluster.client`` (the CLI runs on CI
hosts). The CLI calls :func:`upload_workspace` before ``POST /execute`` (putting the
returned digest in the task's ``workspace`` field), then :func:`download_artifacts` and
:func:`junit_summaries` after the task ends.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import os
import re
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import attrs

from oxide_cluster.client import Node, NodeError
from oxide_cluster.manifest import (
    FileEntry,
    LinkEntry,
    Manifest,
    ManifestError,
    build_manifest,
    check_relative_path,
    normal_mode,
)

MISSING_BATCH = 5000
# Blobs up to this size travel together in ``POST /cas/batch`` bodies of up to
# BATCH_BYTES (thousands of single PUTs cost a round trip each); larger ones by PUT.
# UPLOADS requests at a time: the node writes one body into its cache while the next
# arrives (it streams each into the cache as it comes, see cas_http.py).
BATCH_BLOB_MAX = 1024 * 1024
BATCH_BYTES = 16 * 1024 * 1024
BATCH_BLOBS = 2048
UPLOADS = 2
_WRITE = 256 * 1024
_READ = 1024 * 1024


class WorkspaceError(Exception):
    """The local tree cannot be sent as it is, or artifacts cannot be written; the
    message names the path."""


@attrs.frozen
class LocalTree:
    """A manifest and, for each digest, one local file holding those bytes."""

    manifest: Manifest
    sources: dict[str, str | Path]


@attrs.frozen
class UploadResult:
    """What :func:`upload_workspace` sent: ``digest`` goes into the task's ``workspace``."""

    digest: str
    files: int
    total_bytes: int
    uploaded_blobs: int
    uploaded_bytes: int


def _git_files(root: Path) -> list[str] | None:
    """Tracked plus untracked-but-not-ignored files, or None outside a git work tree."""
    try:
        inside = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-prefix"],
                                capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    if inside.returncode != 0 or inside.stdout.strip():
        return None  # not a work tree, or ``root`` is a subdirectory of one: walk it
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard",
                             "-z"], capture_output=True, check=True)
    names = {name.decode("utf-8", "surrogateescape")
             for name in listed.stdout.split(b"\0") if name}
    return sorted(names)


def _excluded(relative: str, excludes: Sequence[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(relative, pattern) or fnmatch.fnmatchcase(name, pattern)
               for pattern in excludes)


def _walk(root: Path, excludes: Sequence[str]) -> Iterator[str]:
    """Relative paths of everything but directories (symlinked directories travel as
    symlinks), entering directories that are not excluded. ``os.scandir`` tells a
    directory from the rest by the entry's type, without a ``stat`` per file."""
    pending = [""]
    while pending:
        prefix = pending.pop()
        try:
            listed = os.scandir(f"{root}/{prefix}" if prefix else root)
        except OSError:
            continue  # unreadable: skipped, as os.walk does
        with listed:
            for item in listed:
                relative = prefix + item.name
                if excludes and _excluded(relative, excludes):
                    continue
                if item.is_dir(follow_symlinks=False):
                    pending.append(relative + "/")
                else:
                    yield relative


# A file changed within this long of its hashing could change again with the same
# timestamps (coarse clocks); such entries are not cached. Whole-second timestamps
# (FAT, HFS+, some network filesystems) get the wider window.
RACY_NS = 100_000_000
RACY_COARSE_NS = 2_000_000_000
StatKey = tuple[int, int, int, int]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/oxide-cluster`` (``~/.cache/oxide-cluster``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                               ".cache")
    return Path(base) / "oxide-cluster"


class DigestCache:
    """SHA-256 of a tree's files remembered by (path, size, mtime_ns, inode, ctime_ns),
    so a second scan hashes only files that changed (like git's index).

    Kept in the user's cache dir (``digests/<sha256 of the tree's path>.json``), not
    beside the tree: a file in the tree would be uploaded and show up in ``git status``.
    ctime cannot be set by a user, so a rewrite that restores size and mtime is still
    seen; files changed within ``RACY_NS`` of their hashing are never cached. A missing,
    unreadable or foreign file is an empty cache, never an error."""

    VERSION = 1

    def __init__(self, root: Path, directory: Path | None = None) -> None:
        key = hashlib.sha256(os.fsencode(str(root))).hexdigest()[:32]
        self.path = (directory or default_cache_dir()) / "digests" / f"{key}.json"
        self._old: dict[str, list[Any]] = {}
        self._new: dict[str, list[Any]] = {}
        self.hits = 0
        try:
            body = json.loads(self.path.read_text())
            if body.get("version") == self.VERSION and body.get("root") == str(root):
                self._old = body["files"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass

    def digest(self, relative: str, path: str | Path, info: os.stat_result) -> str:
        key: StatKey = (info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns)
        known = self._old.get(relative)
        if isinstance(known, list) and len(known) == 5 and tuple(known[:4]) == key:
            self.hits += 1
            self._new[relative] = known
            return str(known[4])
        digest = _file_digest(path)
        coarse = info.st_mtime_ns % 1_000_000_000 == 0
        newest = max(info.st_mtime_ns, info.st_ctime_ns)
        if time.time_ns() - newest >= (RACY_COARSE_NS if coarse else RACY_NS):
            self._new[relative] = [*key, digest]
        return digest

    def save(self, root: Path) -> None:
        """Write what this scan saw (entries of deleted files drop out); best effort."""
        if self._new == self._old:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One json.dumps (the C encoder); json.dump writes piece by piece in Python.
            body = json.dumps({"version": self.VERSION, "root": str(root),
                               "files": self._new}, separators=(",", ":"))
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False,
                                             suffix=".tmp") as handle:
                handle.write(body)
            os.replace(handle.name, self.path)
        except OSError:
            pass


def _file_digest(path: str | Path) -> str:
    # os.read on a bare descriptor: a file object costs more than hashing a small file.
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, _READ):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def scan_tree(root: str | Path, excludes: Sequence[str] = (),
              cache_dir: Path | None = None, use_cache: bool = True) -> LocalTree:
    """The manifest of ``root``: what git would consider in a git work tree, else every
    file minus ``excludes`` (fnmatch on the relative path or the name). A device, FIFO,
    socket or a symlink leading out of the tree raises WorkspaceError naming it.
    Unchanged files take their digest from the :class:`DigestCache` (``use_cache``)."""
    root = Path(root).resolve()
    cache = DigestCache(root, cache_dir) if use_cache else None
    if not root.is_dir():
        raise WorkspaceError(f"workspace {root} is not a directory")
    listed = _git_files(root)
    names = [n for n in listed if not _excluded(n, excludes)] if listed is not None \
        else list(_walk(root, excludes))
    files: list[FileEntry] = []
    links: list[LinkEntry] = []
    sources: dict[str, str | Path] = {}
    prefix = f"{root}/"  # strings, not a Path per file: thousands of them
    for relative in names:  # paths are checked by build_manifest
        path = prefix + relative
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue  # tracked by git but deleted in the work tree
        if stat.S_ISLNK(info.st_mode):
            links.append(LinkEntry(relative, os.readlink(path)))
        elif stat.S_ISREG(info.st_mode):
            digest = cache.digest(relative, path, info) if cache is not None \
                else _file_digest(path)
            files.append(FileEntry(relative, normal_mode(info.st_mode), info.st_size, digest))
            sources.setdefault(digest, path)
        elif stat.S_ISDIR(info.st_mode):
            continue  # a git submodule: not part of this tree's content
        else:
            raise WorkspaceError(f"{relative} is a device, FIFO or socket; only files and "
                                 "symlinks can be sent (exclude it with --exclude)")
    try:
        manifest = build_manifest(files, links)
    except ManifestError as error:
        raise WorkspaceError(f"{error} (exclude it with --exclude)") from None
    if cache is not None:
        cache.save(root)
    return LocalTree(manifest, sources)


Body = bytes | tuple[int, Callable[[], Iterable[bytes]]] | None


class _Connection:
    """One keep-alive HTTP connection for many small requests (thousands of blobs)."""

    def __init__(self, node: Node) -> None:
        parts = urllib.parse.urlsplit(node.url)
        self._prefix = parts.path.rstrip("/")
        factory = http.client.HTTPSConnection if parts.scheme == "https" \
            else http.client.HTTPConnection
        self._connection = factory(parts.netloc, timeout=node.timeout)
        self._headers = {"X-Cluster-Secret": node.secret} if node.secret else {}
        self.url = node.url

    def call(self, method: str, path: str, body: Body = None,
             content_type: str = "application/octet-stream") -> tuple[int, bytes]:
        """One request; a streamed body is (length, a function making its chunks)."""
        status, reply = self.stream(method, path, body, content_type)
        return status, reply.read()

    def stream(self, method: str, path: str, body: Body = None,
               content_type: str = "application/octet-stream",
               ) -> tuple[int, http.client.HTTPResponse]:
        """A request whose reply body the caller reads (to the end, before the next).

        Sent once more when the node had closed the idle keep-alive connection (the
        request or its answer's first line fails), never after an answer began."""
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = content_type
        if isinstance(body, tuple):
            headers["Content-Length"] = str(body[0])
        for attempt in (1, 2):
            try:
                sent = body[1]() if isinstance(body, tuple) else body
                self._connection.request(method, self._prefix + path, sent, headers)
                reply = self._connection.getresponse()
                return reply.status, reply
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._connection.close()
                if attempt == 2:
                    raise
            except OSError as error:
                raise NodeError(0, "unreachable", f"cannot reach {self.url}: {error}") \
                    from None
        raise AssertionError("unreachable")

    def checked(self, method: str, path: str, body: Body = None,
                content_type: str = "application/octet-stream") -> bytes:
        status, data = self.call(method, path, body, content_type)
        if status >= 400:
            try:
                detail = json.loads(data)["error"]
                code, message = str(detail["code"]), str(detail["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", data[:200].decode("utf-8", "replace")
            raise NodeError(status, code, f"{method} {path}: {message}")
        return data

    def close(self) -> None:
        self._connection.close()


def missing_digests(connection: _Connection, digests: Sequence[str]) -> list[str]:
    lacking: list[str] = []
    for start in range(0, len(digests), MISSING_BATCH):
        body = json.dumps(list(digests[start:start + MISSING_BATCH])).encode()
        reply = connection.checked("POST", "/cas/missing", body, "application/json")
        lacking.extend(json.loads(reply)["missing"])
    return lacking


def _file_chunks(path: str | Path, digest: str) -> Iterator[bytes]:
    """A large blob's bytes, streamed and checked against its digest on the way."""
    hashed = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            hashed.update(chunk)
            yield chunk
    if hashed.hexdigest() != digest:
        raise WorkspaceError(f"{path} changed while being sent")


def _frames(blobs: Sequence[tuple[str, int]], sources: dict[str, str | Path]
            ) -> Iterator[bytes]:
    """A ``POST /cas/batch`` body, read file by file and written in pieces of about
    ``_WRITE`` bytes (never the whole batch in memory). Not hashed again here: the node
    checks every frame against its digest (a file changed since the scan is refused
    with ``digest_mismatch``, reported by :func:`upload_tree`)."""
    pending: list[bytes] = []
    pending_size = 0
    for digest, size in blobs:
        with open(sources[digest], "rb") as handle:
            data = handle.read()
        if len(data) != size:
            raise WorkspaceError(f"{sources[digest]} changed while being sent")
        pending += [f"{digest} {size}\n".encode(), data]
        pending_size += len(data) + 80
        if pending_size >= _WRITE:
            yield b"".join(pending)
            pending, pending_size = [], 0
    if pending:
        yield b"".join(pending)


def _batches(blobs: Sequence[tuple[str, int]]) -> Iterator[list[tuple[str, int]]]:
    batch: list[tuple[str, int]] = []
    size = 0
    for blob in blobs:
        if batch and (size + blob[1] > BATCH_BYTES or len(batch) >= BATCH_BLOBS):
            yield batch
            batch, size = [], 0
        batch.append(blob)
        size += blob[1]
    if batch:
        yield batch


# Told (bytes sent so far, bytes to send) after each request of an upload.
Progress = Callable[[int, int], None]


class _Sent:
    """The bytes an upload's threads have sent, reported to ``progress`` in order."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self._progress = progress
        self._lock = threading.Lock()

    def add(self, size: int) -> None:
        with self._lock:
            self.done += size
            if self._progress is not None:
                self._progress(self.done, self.total)


def upload_workspace(node: Node, root: str | Path, excludes: Sequence[str] = (),
                     progress: Progress | None = None) -> UploadResult:
    """Send ``root`` by content: the blobs the node lacks (small ones in batches, large
    ones one PUT each), then the manifest. Returns the manifest digest for the task's
    ``workspace`` field. Raises WorkspaceError (bad tree) or NodeError (the node refused
    or cannot be reached)."""
    return upload_tree(node, scan_tree(root, excludes), progress)


def _send_batches(node: Node, batches: list[list[tuple[str, int]]],
                  sources: dict[str, str | Path], sent_so_far: _Sent) -> int:
    """Send batches over one connection (run by each of the UPLOADS threads, which share
    ``batches``); the bytes sent."""
    connection = _Connection(node)
    sent = 0
    try:
        while batches:
            try:
                batch = batches.pop(0)
            except IndexError:
                break
            length = sum(len(f"{digest} {size}\n") + size for digest, size in batch)
            try:
                connection.checked("POST", "/cas/batch",
                                   (length, partial(_frames, batch, sources)))
            except NodeError as error:
                if error.code == "digest_mismatch":
                    raise WorkspaceError(f"a file changed while being sent ({error})") \
                        from None
                raise
            batch_bytes = sum(size for _, size in batch)
            sent += batch_bytes
            sent_so_far.add(batch_bytes)
    finally:
        connection.close()
    return sent


def upload_tree(node: Node, tree: LocalTree, progress: Progress | None = None
                ) -> UploadResult:
    """Send an already scanned tree (the fan-out splits files from the same scan);
    ``progress`` hears of every request's bytes once it is answered."""
    manifest_bytes = tree.manifest.encode()
    manifest_digest = hashlib.sha256(manifest_bytes).hexdigest()
    sizes = {entry.digest: entry.size for entry in tree.manifest.files}
    connection = _Connection(node)
    try:
        wanted = sorted(tree.sources) + [manifest_digest]
        lacking = missing_digests(connection, wanted)
        blobs = [(digest, sizes[digest]) for digest in lacking if digest != manifest_digest]
        small = [blob for blob in blobs if blob[1] <= BATCH_BLOB_MAX]
        batches = list(_batches(small))
        sent_so_far = _Sent(sum(size for _, size in blobs) + (
            len(manifest_bytes) if manifest_digest in lacking else 0), progress)
        workers = min(UPLOADS, len(batches))
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                sent_bytes = sum(pool.map(lambda _: _send_batches(node, batches,
                                                                  tree.sources, sent_so_far),
                                          range(workers)))
        else:
            sent_bytes = _send_batches(node, batches, tree.sources, sent_so_far)
        for digest, size in blobs:
            if size > BATCH_BLOB_MAX:
                connection.checked("PUT", f"/cas/{digest}",
                                   (size, partial(_file_chunks, tree.sources[digest], digest)))
                sent_bytes += size
                sent_so_far.add(size)
        if manifest_digest in lacking:
            connection.checked("PUT", f"/cas/{manifest_digest}", manifest_bytes)
            sent_bytes += len(manifest_bytes)
            sent_so_far.add(len(manifest_bytes))
    finally:
        connection.close()
    return UploadResult(manifest_digest, len(tree.manifest.files), tree.manifest.total_size,
                        len(lacking), sent_bytes)


def download_artifacts(node: Node, task_id: str, directory: str | Path) -> list[Path]:
    """Fetch every artifact of a task into ``directory``, keeping relative paths. Paths
    from the node are checked again: nothing is written outside ``directory``."""
    quoted_id = urllib.parse.quote(task_id, safe="")
    listing = node.request("GET", f"/task/{quoted_id}/artifacts")
    target_root = Path(directory).resolve()
    written = []
    connection = _Connection(node)
    try:
        for entry in listing["artifacts"]:
            relative = entry["path"]
            try:
                check_relative_path(relative)
            except ManifestError as error:
                raise WorkspaceError(f"the node listed a bad artifact path: {error}") \
                    from None
            target = target_root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            path = f"/task/{quoted_id}/artifacts/{urllib.parse.quote(relative)}"
            _download(connection, path, target, entry["sha256"], relative)
            written.append(target)
    finally:
        connection.close()
    return written


def _download(connection: _Connection, path: str, target: Path, digest: str,
              relative: str) -> None:
    """Stream one artifact into a temporary file beside ``target``, checking its sha256
    on the way, and rename it into place (a symlink there is replaced, not followed)."""
    status, reply = connection.stream("GET", path)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".oxide-", delete=False) \
            as spool:
        try:
            hashed = hashlib.sha256()
            if status >= 400:
                raise WorkspaceError(f"artifact {relative}: HTTP {status}: "
                                     f"{reply.read(200).decode('utf-8', 'replace')}")
            for chunk in iter(lambda: reply.read(_READ), b""):
                hashed.update(chunk)
                spool.write(chunk)
            if hashed.hexdigest() != digest:
                raise WorkspaceError(f"artifact {relative} does not match its sha256")
        except BaseException:
            os.unlink(spool.name)
            raise
    os.replace(spool.name, target)


# -- JUnit ------------------------------------------------------------------------------


@attrs.frozen
class JUnitSummary:
    tests: int
    failures: int
    errors: int
    skipped: int
    time: float

    def line(self, name: str = "") -> str:
        """The one line the CLI prints per report."""
        where = f"{name}: " if name else ""
        return (f"{where}{self.tests} tests, {self.failures} failures, {self.errors} errors, "
                f"{self.skipped} skipped in {self.time:.2f}s")


_DOCTYPE = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)


def _number(element: ElementTree.Element, name: str) -> float:
    try:
        return float(element.get(name) or 0)
    except ValueError:
        return 0.0


def junit_summary(data: bytes) -> JUnitSummary | None:
    """Totals of a JUnit XML report, or None if ``data`` is not one. A document with a
    DOCTYPE or entity declarations is refused (no defusedxml here: no entity expansion,
    so no billion laughs and no external entities)."""
    if _DOCTYPE.search(data):
        return None
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        return None
    if root.tag == "testsuite":
        suites = [root]
    elif root.tag == "testsuites":
        suites = root.findall("testsuite")
    else:
        return None
    tests = failures = errors = skipped = 0
    seconds = 0.0
    for suite in suites:
        cases = suite.findall("testcase")
        tests += int(_number(suite, "tests")) if suite.get("tests") else len(cases)
        failures += int(_number(suite, "failures")) if suite.get("failures") \
            else sum(1 for case in cases if case.find("failure") is not None)
        errors += int(_number(suite, "errors")) if suite.get("errors") \
            else sum(1 for case in cases if case.find("error") is not None)
        skipped += int(_number(suite, "skipped") or _number(suite, "skips")) \
            if suite.get("skipped") or suite.get("skips") \
            else sum(1 for case in cases if case.find("skipped") is not None)
        seconds += _number(suite, "time")
    return JUnitSummary(tests, failures, errors, skipped, seconds)


def junit_summaries(paths: Sequence[Path]) -> list[tuple[Path, JUnitSummary]]:
    """The JUnit reports among downloaded artifacts (``*.xml`` that parse as one)."""
    found = []
    for path in paths:
        if path.suffix.lower() == ".xml":
            summary = junit_summary(path.read_bytes())
            if summary is not None:
                found.append((path, summary))
    return found

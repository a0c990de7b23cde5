"""The node's content-addressed blob store: files named by their SHA-256, in the state dir.

A blob is written to a temporary file while its digest is computed, and renamed to its
name only if the digest matches: a reader never sees a partial or wrong blob, and an agent
killed mid-write leaves only a temporary file (swept at start). Blobs of a
``POST /cas/batch`` are not flushed one step at a time: an upload ends with a single
``PUT`` (the manifest), and that ``PUT`` is acknowledged only after one ``syncfs``
flushed every batch blob renamed before it (``flush``; a single ``PUT`` of its own is
``fsync``-ed, file and directory). A task's uploaded blobs are flushed before its tree is
built. A power loss can still tear a blob renamed but not yet
flushed, or one fetched from a peer (not flushed: it can be fetched again): every blob
found at start is *unverified* until a task first needs it, then hashed once
(``verify``) and dropped if its bytes no longer match its name (hashing at start would
cost ~1 s per 100 MB read cold, before any task could run); so are the blobs a failed
``flush`` leaves in doubt. The cache has a size cap
(``workspace_cache``); past it, the least recently used blobs go, except those pinned: a
queued or running task pins its workspace's blobs, and a task's artifacts stay pinned
for as long as the task keeps them. The index and the pins live on the reactor thread;
every file operation runs on the store's own small thread pool.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import io
import itertools
import os
import shutil
import stat
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import BinaryIO, TypeVar

import attrs
from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from oxide_cluster.manifest import is_digest

CHUNK = 1024 * 1024
# ``POST /cas/batch``: frames of ``<digest> <length>\n<bytes>``, written to the cache a
# step at a time (one thread hop per step, not per blob).
BATCH_STEP_BLOBS = 256
BATCH_STEP_BYTES = 16 * CHUNK
_FRAME_HEADER_MAX = 64 + 1 + 20 + 1
BATCH_READ = CHUNK  # socket reads of a batch body's connection (api.batch_sink)
BATCH_BUFFER = 8 * CHUNK  # a streamed batch body buffered before its sender is paused
# Batch blobs left unflushed at most (no manifest PUT, no task): then one flush.
FLUSH_BACKLOG = 65536
FSYNC_MAX = 32  # up to this many unflushed blobs: an fsync each rather than a syncfs
STREAMING_MAX = 2  # at most this many pool threads wait on a batch body's bytes
_SERIAL = itertools.count()
T = TypeVar("T")
# Runs a blocking function somewhere that is not the reactor thread (tests: right away).
Offload = Callable[[Callable[[], T]], "defer.Deferred[T]"]


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return function


_SYNCFS = _load_syncfs()


def sync_filesystem(path: Path) -> None:
    """Flush every dirty page and inode of ``path``'s filesystem (``syncfs``, else
    ``sync``): one call instead of an ``fsync`` per file of a batch."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number))
    finally:
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_files(paths: list[Path]) -> None:
    """``fsync`` each file (one evicted meanwhile is skipped), then each directory."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for directory in dict.fromkeys(path.parent for path in paths):
        _fsync_directory(directory)


def _matches(path: Path, digest: str) -> bool:
    """Whether the file at ``path`` hashes to ``digest`` (False if it is gone)."""
    hashed = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                hashed.update(chunk)
    except FileNotFoundError:
        return False
    return hashed.hexdigest() == digest


class BlobError(Exception):
    """A blob is refused; ``status`` is the HTTP status that says why (400, 413, 507)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _write_all(fd: int, data: bytes | memoryview) -> None:
    written = os.write(fd, data)
    while written < len(data):  # a regular file writes it all, bar a signal
        data = memoryview(data)[written:]
        written = os.write(fd, data)


def _copy_hashing(source: BinaryIO, target: int, limit: int) -> tuple[str, int]:
    """Copy to the descriptor ``target`` in chunks (never the whole blob in memory);
    stop past ``limit`` bytes. Bare ``os.write``: a file object per blob cost more than
    writing a small blob (thousands per upload)."""
    digest = hashlib.sha256()
    size = 0
    while True:
        chunk = source.read(CHUNK)
        if not chunk:
            return digest.hexdigest(), size
        size += len(chunk)
        if size > limit:
            raise BlobError(413, "blob_too_large",
                            f"blob is over the limit of {limit} bytes (workspace_cache)")
        digest.update(chunk)
        _write_all(target, chunk)


class _Exactly:
    """``length`` bytes of ``source`` read as a file of their own (one batch frame)."""

    def __init__(self, source: BinaryIO, length: int) -> None:
        self._source = source
        self.left = length

    def read(self, size: int) -> bytes:
        if self.left <= 0:
            return b""
        chunk = self._source.read(min(size, self.left))
        if not chunk:
            raise BlobError(400, "bad_batch", f"the batch ends {self.left} bytes short "
                                              "of a frame's length")
        self.left -= len(chunk)
        return chunk


def read_frame_header(source: BinaryIO) -> tuple[str, int] | None:
    """The next batch frame's (digest, length), or None at the end of the body."""
    line = source.readline(_FRAME_HEADER_MAX)
    if not line:
        return None
    fields = line[:-1].split(b" ") if line.endswith(b"\n") else []
    if len(fields) != 2 or not fields[1].isdigit() or len(fields[1]) > 20:
        raise BlobError(400, "bad_batch", "a batch frame starts with '<sha256> <length>\\n'; "
                                          f"got {line[:100]!r}")
    digest = fields[0].decode("ascii", "replace")
    if not is_digest(digest):
        raise BlobError(400, "bad_digest", "a digest is 64 lowercase hex characters")
    return digest, int(fields[1])


class _Pipe:
    """A batch body handed from the reactor thread (``feed``) to the thread writing it
    into the cache (``read``/``readline``, blocking). The chunks Twisted received are
    passed on as views, not copied; past ``high`` buffered bytes the sender is paused,
    so a fast client costs at most that much memory."""

    def __init__(self, high: int, pause: Callable[[], None],
                 resume: Callable[[], None]) -> None:
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._ready = threading.Condition()
        self._state = "open"  # "end": no more bytes; "abort": the request went away
        self._high = high
        self._pause = pause
        self._resume = resume
        self.paused = False

    def feed(self, data: bytes) -> None:
        with self._ready:
            self._chunks.append(memoryview(data))
            self._buffered += len(data)
            self._ready.notify()
            pause = not self.paused and self._buffered > self._high
            self.paused = self.paused or pause
        if pause:
            self._pause()

    def close(self, state: str) -> None:
        with self._ready:
            if self._state == "open":
                self._state = state
            self._ready.notify()

    def _wait(self) -> bool:
        """Wait for bytes; False at the end of the body."""
        while not self._chunks and self._state == "open":
            self._ready.wait()
        if not self._chunks and self._state == "abort":
            raise BlobError(400, "aborted", "the request ended before its body")
        return bool(self._chunks)

    def _take(self, size: int) -> memoryview:
        head = self._chunks[0]
        if len(head) <= size:
            self._chunks.popleft()
        else:
            self._chunks[0] = head[size:]
            head = head[:size]
        self._buffered -= len(head)
        if self.paused and self._buffered < self._high // 4 and self._state == "open":
            self.paused = False
            self._resume()
        return head

    def read(self, size: int) -> memoryview | bytes:
        with self._ready:
            return self._take(size) if self._wait() else b""

    def readline(self, limit: int) -> bytes:
        line = bytearray()
        with self._ready:
            while len(line) < limit and self._wait():
                head = self._chunks[0]
                end = bytes(head[:limit - len(line)]).find(b"\n")
                line += self._take(end + 1 if end >= 0 else limit - len(line))
                if end >= 0:
                    break
        return bytes(line)


class BatchSink:
    """``request.content`` of a ``POST /cas/batch`` streamed into the cache as it
    arrives: frames are hashed and written by a pool thread while the body is still
    coming (one write of each byte, no spooled copy of the body first)."""

    def __init__(self, store: BlobStore, pipe: _Pipe, length: int) -> None:
        self._pipe = pipe
        self._left = length
        self._received = 0
        self._error: object = None
        self.result = defer.Deferred.fromCoroutine(store.put_batch(pipe))  # type: ignore[arg-type]
        self.result.addErrback(self._keep)

    def _keep(self, failure: object) -> None:
        self._error = failure  # handed to ``finish``; never an unhandled error

    # -- the file-like part Twisted's Request uses ---------------------------------

    def write(self, data: bytes) -> None:
        self._left -= len(data)
        self._received += len(data)
        self._pipe.feed(data)
        if self._left <= 0:
            self._pipe.close("end")

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return self._received

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        self._pipe.close("abort")  # a no-op once the whole body arrived

    async def finish(self) -> BatchResult:
        """What was stored, once the whole body is in the cache (raises BlobError)."""
        self._pipe.close("end")
        result = await self.result
        if self._error is not None:
            self._error.raiseException()  # type: ignore[attr-defined]
        return result


@attrs.frozen
class BatchResult:
    """What ``POST /cas/batch`` stored: new blobs, blobs already here, their bytes."""

    stored: int
    present: int
    size: int


class BlobStore(service.Service):
    """SHA-256 blobs under ``<state_dir>/cas``, LRU-evicted past ``capacity`` bytes."""

    log = Logger()

    def __init__(self, reactor: IReactorThreads, root: Path, capacity: int,
                 offload: Offload[object] | None = None) -> None:
        self._reactor = reactor
        self.root = root
        self._prefix = str(root)
        self.capacity = capacity
        self._pool: ThreadPool | None = None
        self._offload = offload
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._pins: dict[str, int] = {}
        # Found on disk at start and not hashed since (see ``verify``).
        self._unverified: set[str] = set()
        self.corrupt = 0  # blobs dropped since start because their bytes did not match
        self.used = 0
        self.evicted = 0
        self.streaming = 0  # batch bodies being written as they arrive
        # Batch blobs renamed and indexed but not flushed yet, oldest first (``flush``).
        self._unflushed: list[str] = []
        self._flushing = defer.DeferredLock()
        self.flushes = 0  # syncfs calls made by ``flush`` since start (tests, bench)
        # Bytes of task directories kept on this disk after their task (workspace.py:
        # retained for reuse, kept after a failure), counted inside ``capacity``; when a
        # blob cannot fit otherwise, ``reclaim`` drops some of them (see _admit).
        self.trees = 0
        self.reclaim: Callable[[Callable[[], bool]], defer.Deferred[None]] | None = None
        self.loaded: defer.Deferred[None] = defer.Deferred()

    # -- lifecycle --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._offload is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=4, name="oxide-cas")
            self._pool.start()
        self._run(self._scan).addCallbacks(self._indexed, self.loaded.errback)

    def stopService(self) -> None:
        super().stopService()
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    def run(self, function: Callable[[], T]) -> defer.Deferred[T]:
        """Run blocking file work off the reactor thread (shared with the workspaces)."""
        return self._run(function)

    def _run(self, function: Callable[[], T]) -> defer.Deferred[T]:
        if self._offload is not None:
            result: defer.Deferred[T] = self._offload(function)  # type: ignore[assignment]
            return result
        assert self._pool is not None, "the blob store is not running"
        return threads.deferToThreadPool(self._reactor, self._pool, function)

    def _scan(self) -> list[tuple[float, str, int]]:
        """Existing blobs with their last use (atime or mtime). Temp files of an earlier
        run (an interrupted write) are removed, and so is anything in a shard that is
        not named like a blob of that shard."""
        tmp = self.root / "tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
        for number in range(256):  # made once here, not checked per blob
            (self.root / f"{number:02x}").mkdir(exist_ok=True)
        found = []
        for shard in self.root.iterdir():
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for blob in shard.iterdir():
                info = blob.lstat()
                if is_digest(blob.name) and blob.name.startswith(shard.name) \
                        and stat.S_ISREG(info.st_mode):
                    found.append((max(info.st_atime, info.st_mtime), blob.name, info.st_size))
                elif not stat.S_ISDIR(info.st_mode):
                    _unlink(blob)
        found.sort()
        return found

    def _indexed(self, found: list[tuple[float, str, int]]) -> None:
        for _, digest, size in found:
            self._sizes[digest] = size
            self._unverified.add(digest)
            self.used += size
        self.log.info("blob cache: {count} blobs, {used} bytes (cap {cap})",
                      count=len(found), used=self.used, cap=self.capacity)
        self.loaded.callback(None)

    # -- queries (reactor thread, in memory) ------------------------------------

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def file(self, digest: str) -> str:
        """``path`` as a string: no Path object in loops over thousands of blobs."""
        return f"{self._prefix}/{digest[:2]}/{digest}"

    def has(self, digest: str) -> bool:
        return digest in self._sizes

    def size(self, digest: str) -> int | None:
        return self._sizes.get(digest)

    def missing(self, digests: Iterable[str]) -> list[str]:
        """The digests this node lacks, in order; those it has count as just used, so
        they are not evicted between a client's question and its task."""
        lacking: dict[str, None] = {}
        for digest in digests:
            if digest in self._sizes:
                self._sizes.move_to_end(digest)
            else:
                lacking[digest] = None
        return list(lacking)

    def touch(self, digest: str) -> None:
        if digest in self._sizes:
            self._sizes.move_to_end(digest)

    async def verify(self, digests: Iterable[str]) -> list[str]:
        """Hash those of ``digests`` found at start and not checked since, and drop each
        whose bytes do not match its name (torn by a crash or changed on disk); the
        dropped digests, for the caller to fetch again or report."""
        todo = [digest for digest in dict.fromkeys(digests) if digest in self._unverified]
        if not todo:
            return []

        def check() -> list[str]:
            bad = [digest for digest in todo if not _matches(self.path(digest), digest)]
            _unlink_all([self.path(digest) for digest in bad])
            return bad

        bad = await self._run(check)
        self._unverified.difference_update(todo)
        for digest in bad:
            size = self._sizes.pop(digest, None)
            if size is not None:
                self.used -= size
        if bad:
            self.corrupt += len(bad)
            self.log.warn("blob cache: {count} blob(s) dropped, their bytes no longer "
                          "match their digest (first {digest})", count=len(bad),
                          digest=bad[0])
        return bad

    # -- pins -------------------------------------------------------------------

    def pin(self, digests: Iterable[str]) -> None:
        """Keep these blobs until ``unpin``; pins count, so two tasks may share one."""
        for digest in digests:
            self._pins[digest] = self._pins.get(digest, 0) + 1
            self.touch(digest)

    def unpin(self, digests: Iterable[str]) -> None:
        for digest in digests:
            count = self._pins.get(digest, 0) - 1
            if count > 0:
                self._pins[digest] = count
            else:
                self._pins.pop(digest, None)

    def pinned(self, digest: str) -> bool:
        return digest in self._pins

    # -- writes -----------------------------------------------------------------

    async def put_file(self, digest: str, source: BinaryIO, pin: bool = False,
                       durable: bool = True) -> bool:
        """Store ``source``'s bytes as ``digest``; False if it was already there.

        Raises BlobError: 400 when the bytes do not hash to ``digest``, 413 over the cap,
        507 when pinned blobs leave no room. With ``pin``, the blob is pinned as it is
        admitted (no eviction can slip in between). ``durable=False`` skips the flush
        (a blob fetched from a peer: fetched again if a crash tears it).
        """
        if not is_digest(digest):
            raise BlobError(400, "bad_digest", "a digest is 64 lowercase hex characters")
        await self.loaded
        if digest in self._sizes:
            if pin:
                self.pin([digest])
            self.touch(digest)
            return False
        if durable:
            # The upload's last PUT (its manifest): the batches before it go to disk
            # first, so a failed flush leaves no written and unindexed blob behind.
            await self.flush()
        _, size = await self._run(lambda: self._write(digest, source, durable))
        return await self._admit(digest, size, pin)

    async def put_bytes(self, digest: str, data: bytes, pin: bool = False) -> bool:
        return await self.put_file(digest, io.BytesIO(data), pin)

    async def put_stream(self, source: BinaryIO, pin: bool = False,
                         durable: bool = True) -> tuple[str, int]:
        """Store bytes whose digest is not known in advance (artifacts); their digest
        and size. ``durable=False``: the caller flushes several at once (``sync``)."""
        await self.loaded
        digest, size = await self._run(lambda: self._write(None, source, durable))
        await self._admit(digest, size, pin)
        return digest, size

    async def put_batch(self, source: BinaryIO) -> BatchResult:
        """Store every frame of a ``POST /cas/batch`` body, each checked against its
        digest. A bad frame stops the batch with BlobError (the message says how many
        frames before it were kept: each of those was verified, so keeping them is safe)."""
        await self.loaded
        stored = present = total = 0
        while True:
            frames, error, more = await self._run(lambda: self._write_frames(source))
            for index, (digest, size) in enumerate(frames):
                try:
                    admitted = await self._admit(digest, size, False)
                except BlobError as refused:
                    # Written by this step but not admitted: not to be left unindexed.
                    rest = [self.path(d) for d, _ in frames[index + 1:] if d not in self._sizes]
                    await self._run(partial(_unlink_all, rest))
                    error = refused
                    break
                if admitted:
                    self._unflushed.append(digest)
                stored, present = stored + admitted, present + (not admitted)
                total += size
            if error is not None:
                kept = stored + present
                raise BlobError(error.status, error.code,
                                f"{error.message} (frame {kept + 1}; the {kept} before it "
                                "were kept)")
            if len(self._unflushed) >= FLUSH_BACKLOG:
                await self.flush()  # batches without a manifest PUT or a task for long
            if not more:
                return BatchResult(stored, present, total)

    def sync(self) -> defer.Deferred[None]:
        """Flush blobs stored with ``durable=False`` (one ``syncfs`` for all of them)."""
        return self._run(lambda: sync_filesystem(self.root))

    async def flush(self, digests: Iterable[str] | None = None) -> None:
        """Put the batch blobs stored so far on disk with one ``syncfs`` (an ``fsync``
        each, and of their directories, when they are at most ``FSYNC_MAX``: syncfs
        also writes every task directory's dirty pages); with ``digests``, only if one
        of them is still unflushed (else nothing to do).

        If the flush fails, the blobs it was for are in doubt: they become unverified
        (hashed before a task uses them, see ``verify``) and BlobError 507 is raised
        for a full disk (the OSError otherwise)."""
        # One flush at a time: each removes from the list exactly the blobs it covered.
        await self._flushing.acquire()
        try:
            await self._flush(digests)
        finally:
            self._flushing.release()

    async def _flush(self, digests: Iterable[str] | None) -> None:
        if not self._unflushed:
            return
        if digests is not None and self._unflushed_set().isdisjoint(digests):
            return
        # Every blob listed here was renamed before this syncfs starts; blobs renamed
        # meanwhile stay listed for the next flush.
        count = len(self._unflushed)
        self.flushes += 1
        few = [self.path(digest) for digest in self._unflushed] if count <= FSYNC_MAX else None
        try:
            await self._run(lambda: sync_filesystem(self.root) if few is None
                            else _fsync_files(few))
        except OSError as error:
            doubtful = self._unflushed[:count]
            del self._unflushed[:count]
            self._unverified.update(digest for digest in doubtful if digest in self._sizes)
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                raise BlobError(507, "disk_full", "the uploaded blobs could not be "
                                f"flushed to disk ({error.strerror}); they are checked "
                                "again before use") from None
            raise
        del self._unflushed[:count]

    def _unflushed_set(self) -> set[str]:
        return set(self._unflushed)

    def _write_frames(self, source: BinaryIO
                      ) -> tuple[list[tuple[str, int]], BlobError | None, bool]:
        """One step of a batch (blocking): (written frames, the error that stopped it,
        whether frames may follow). The step's frames are written to temp files and
        renamed; flushed later, once for the whole upload (``flush``)."""
        pending: list[tuple[str, str, int]] = []
        try:
            error, more = self._write_step(source, pending)
            self._commit(pending)
        except BaseException:
            # Nothing of a step that could not be flushed stays, temp or renamed.
            _unlink_all([Path(temp) for temp, _, _ in pending]
                        + [self.path(digest) for _, digest, _ in pending
                           if digest not in self._sizes])
            raise
        return [(digest, size) for _, digest, size in pending], error, more

    def _commit(self, pending: list[tuple[str, str, int]]) -> None:
        if not pending:
            return
        try:
            # Renamed before the data is on disk: a power loss before ``flush`` can
            # leave a torn blob under its name, which is what ``verify`` finds out.
            for temp, digest, _ in pending:
                self._rename(temp, digest)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise BlobError(507, "disk_full", "no space left for the blob") from None
            raise

    def _write_step(self, source: BinaryIO, pending: list[tuple[str, str, int]]
                    ) -> tuple[BlobError | None, bool]:
        step_bytes = 0
        try:
            while len(pending) < BATCH_STEP_BLOBS and step_bytes < BATCH_STEP_BYTES:
                header = read_frame_header(source)
                if header is None:
                    return None, False
                digest, length = header
                if length > self.capacity:
                    raise BlobError(413, "blob_too_large",
                                    f"blob {digest} is over the limit of {self.capacity} "
                                    "bytes (workspace_cache)")
                frame = _Exactly(source, length)
                temp, _, size = self._write_temp(digest, frame, False)  # type: ignore[arg-type]
                pending.append((temp, digest, size))
                step_bytes += size
        except BlobError as error:
            return error, False
        return None, True

    def _write(self, expected: str | None, source: BinaryIO, durable: bool
               ) -> tuple[str, int]:
        """One blob: to a temp file (fsynced if ``durable``), renamed to its digest, and
        with ``durable`` its directory entry fsynced too."""
        temp, actual, size = self._write_temp(expected, source, durable)
        try:
            final = self._rename(temp, actual)
            temp = ""
            if durable:
                _fsync_directory(Path(final).parent)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise BlobError(507, "disk_full", "no space left for the blob") from None
            raise
        finally:
            if temp:
                _unlink(Path(temp))
        return actual, size

    def _rename(self, temp: str, digest: str) -> str:
        final = self.file(digest)
        try:
            os.replace(temp, final)
        except FileNotFoundError:  # its shard directory is not made yet
            Path(final).parent.mkdir(exist_ok=True)
            os.replace(temp, final)
        return final

    def _write_temp(self, expected: str | None, source: BinaryIO, fsync: bool
                    ) -> tuple[str, str, int]:
        """Copy ``source`` to a new temp file while hashing it: (temp path, digest, size).
        Nothing is left behind if this raises."""
        # A temp name of our own (no mkstemp retries), created read-only: no chmod after.
        temp_name = f"{self._prefix}/tmp/put-{threading.get_ident()}-{next(_SERIAL)}"
        try:
            fd = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            try:
                actual, size = _copy_hashing(source, fd, self.capacity)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if expected is not None and actual != expected:
                raise BlobError(400, "digest_mismatch",
                                f"the bytes hash to {actual}, not {expected}")
            done, temp_name = temp_name, ""
            return done, actual, size
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise BlobError(507, "disk_full", "no space left for the blob") from None
            raise
        finally:
            if temp_name:
                _unlink(Path(temp_name))

    async def _admit(self, digest: str, size: int, pin: bool) -> bool:
        if digest in self._sizes:  # a concurrent upload of the same bytes won
            if pin:
                self.pin([digest])
            return False
        victims = self._choose_victims(size)
        if victims is None and self.trees and self.reclaim is not None:
            await self.reclaim(lambda: self.room_for(size))
            if digest in self._sizes:
                if pin:
                    self.pin([digest])
                return False
            victims = self._choose_victims(size)
        if victims is None:
            await self._run(lambda: _unlink(self.path(digest)))
            raise BlobError(507, "cache_full",
                            f"the blob cache holds {self.used} bytes of blobs that queued or "
                            f"running tasks need; {size} more do not fit in "
                            f"workspace_cache={self.capacity}")
        self._sizes[digest] = size
        self.used += size
        if pin:
            self.pin([digest])
        if victims:
            paths = [self.path(victim) for victim in victims]
            await self._run(lambda: _unlink_all(paths))
        return True

    def room_for(self, incoming: int) -> bool:
        """Whether ``incoming`` bytes fit once every unpinned blob is evicted."""
        pinned = sum(size for digest, size in self._sizes.items() if digest in self._pins)
        return pinned + self.trees + incoming <= self.capacity

    def fits(self, incoming: int) -> bool:
        """Whether ``incoming`` more bytes fit without evicting anything."""
        return self.used + self.trees + incoming <= self.capacity

    def _choose_victims(self, incoming: int) -> list[str] | None:
        """Least recently used unpinned blobs to drop so ``incoming`` bytes fit; None if
        even dropping all of them would not be enough. Dropped from the index at once."""
        excess = self.used + self.trees + incoming - self.capacity
        if excess <= 0:
            return []
        chosen, freed = [], 0
        for digest, size in self._sizes.items():
            if freed >= excess:
                break
            if digest not in self._pins:
                chosen.append(digest)
                freed += size
        if freed < excess:
            return None
        for digest in chosen:
            self.used -= self._sizes.pop(digest)
        self.evicted += len(chosen)
        return chosen

    def batch_sink(self, length: int, pause: Callable[[], None],
                   resume: Callable[[], None]) -> BatchSink | None:
        """A ``request.content`` writing a batch body into the cache as it arrives;
        None where there is no thread to write it (a store running work in line)."""
        if self._pool is None or self.streaming >= STREAMING_MAX:
            return None  # the others wait in a spooled file: threads are few
        reactor = self._reactor
        pipe = _Pipe(BATCH_BUFFER, pause, lambda: reactor.callFromThread(resume))
        sink = BatchSink(self, pipe, length)
        self.streaming += 1

        def done(result: object) -> object:
            self.streaming -= 1
            return result

        sink.result.addBoth(done)
        return sink

    def open(self, digest: str) -> BinaryIO:
        """Open a stored blob for reading (blocking: call it off the reactor thread)."""
        return open(self.path(digest), "rb")


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        _unlink(path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass

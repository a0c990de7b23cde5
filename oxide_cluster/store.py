"""Durable state in SQLite: tasks, their output chunks, and known peers.

All SQLite work runs on one dedicated thread, never on the reactor. Operations queue up
while a batch is being written and the next batch commits them in one transaction, so
a burst of output chunks costs one commit, not one per chunk. A Deferred returned by a
write fires only after its batch has committed: an acknowledged byte is on disk (WAL,
``synchronous=NORMAL``: safe against a crash of the agent; a power cut may lose the
last batch).
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from oxide_cluster.model import Task, TaskState
from oxide_cluster.waiters import Waiters

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    state TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, id);
CREATE TABLE IF NOT EXISTS output (
    task_id TEXT NOT NULL,
    offset INTEGER NOT NULL,
    stream TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (task_id, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS peers (node_id TEXT PRIMARY KEY, record TEXT NOT NULL);
"""

# Schema changes, by the version they lead to; ``_SCHEMA`` is version 1's shape.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # The scheduler's queue: dispatch order and idempotency keys, queryable by index.
    2: (
        "ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN task_group TEXT",
        "ALTER TABLE tasks ADD COLUMN queue_seq INTEGER",
        "ALTER TABLE tasks ADD COLUMN idempotency_key TEXT",
        "CREATE INDEX IF NOT EXISTS tasks_by_idempotency_key ON tasks (idempotency_key)"
        " WHERE idempotency_key IS NOT NULL",
    ),
    # Retention: finished tasks found oldest first by index, not by reading every record.
    3: (
        "ALTER TABLE tasks ADD COLUMN finished_at REAL",
        "UPDATE tasks SET finished_at = coalesce(json_extract(record, '$.finished_at'), 0)"
        " WHERE state NOT IN ('queued', 'running')",
        "CREATE INDEX IF NOT EXISTS tasks_by_finished_at ON tasks (finished_at, id)"
        " WHERE finished_at IS NOT NULL",
    ),
    # Recorded per-file durations of a test suite (``--split`` balances by them).
    4: (
        "CREATE TABLE IF NOT EXISTS suite_durations (suite TEXT PRIMARY KEY,"
        " durations TEXT NOT NULL)",
    ),
}

# Pages handed back to the filesystem per ``PRAGMA incremental_vacuum`` step (4 MiB in all,
# about 0.1 s here): one short turn of the store's thread, so writes wait at most that long.
VACUUM_STEP_PAGES = 1024

T = TypeVar("T")
TaskRow = tuple[str, str, str, str, int, str | None, int | None, str | None, float | None]
Operation = Callable[[sqlite3.Connection], Any]


_IDLE = "idle"  # flushed(): everything queued so far is committed
_BACKLOG = "backlog"  # when_backlog_below(limit), marked with the limit


@attrs.define(eq=False)  # by identity: its waiters are keyed by the put
class _TaskPut:
    """A queued task write; a later put of the same task that finds it at the tail of
    the queue replaces its row instead of queueing a second write."""

    task_id: str
    row: TaskRow


def _insert_task(connection: sqlite3.Connection, row: TaskRow) -> None:
    connection.execute(
        "INSERT OR REPLACE INTO tasks (id, node_id, state, record, priority, task_group,"
        " queue_seq, idempotency_key, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)


def _task_row(task: Task) -> TaskRow:
    return (task.id, task.node_id, task.state.value, task_to_record(task), task.priority,
            task.group, task.queue_seq, task.idempotency_key, _finished_at(task))


def _finished_at(task: Task) -> float | None:
    """The retention clock of a task: set once it is finished, whatever its record says."""
    if not task.state.terminal:
        return None
    return task.finished_at if task.finished_at is not None else task.created_at


@attrs.frozen
class PruneBatch:
    """What one batch of :meth:`Store.prune_batch` deleted, and the store's size after it."""

    task_ids: list[str]
    output_chunks: int
    used_bytes: int
    more: bool


def _used_bytes(connection: sqlite3.Connection) -> int:
    """Bytes in pages that hold data (free pages are reclaimed by the vacuum)."""
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    free = connection.execute("PRAGMA freelist_count").fetchone()[0]
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * page_size)


class StoreError(RuntimeError):
    """The store cannot be opened or written (bad path, disk full, newer schema)."""


def task_to_record(task: Task) -> str:
    fields = attrs.asdict(task, recurse=False)
    fields["state"] = task.state.value
    return json.dumps(fields, separators=(",", ":"))


def task_from_record(record: str) -> Task:
    fields = json.loads(record)
    fields["state"] = TaskState(fields["state"])
    return Task(**fields)


class Store(service.Service):
    """SQLite-backed state of one node, opened in ``startService``."""

    log = Logger()

    def __init__(self, reactor: IReactorThreads, path: Path) -> None:
        self._reactor = reactor
        self.path = path
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="oxide-store")
        self._connection: sqlite3.Connection | None = None
        self._queue: list[tuple[Operation | _TaskPut, defer.Deferred[Any]]] = []
        self._writing = False
        # One helper for every wait here: a waiter that gives up (cancelled) leaves at once.
        self._waiters: Waiters[object, None] = Waiters()  # a _TaskPut, _IDLE or _BACKLOG
        self.output_backlog = 0
        self.failed_batches = 0
        self._last_failure_log = float("-inf")
        self.is_open = False

    # -- lifecycle --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._pool.start()
        self.opened = self._run(self._open)
        self.opened.addCallback(self._mark_open)

    def _mark_open(self, _: object) -> None:
        self.is_open = True

    def _open(self) -> None:
        try:
            connection = sqlite3.connect(str(self.path), isolation_level=None,
                                         check_same_thread=False)
            # Before the first table exists, this takes effect without a VACUUM.
            connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(_SCHEMA)
            row = connection.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error as error:
            raise StoreError(f"cannot open the store {self.path}: {error}") from error
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise StoreError(f"store {self.path} has schema {row[0]}, newer than this "
                             f"agent understands ({SCHEMA_VERSION})")
        self._migrate(connection, 1 if row is None else int(row[0]), fresh=row is None)
        self._enable_incremental_vacuum(connection)
        self._connection = connection

    def _enable_incremental_vacuum(self, connection: sqlite3.Connection) -> None:
        """A store made before retention existed needs one VACUUM to switch, so that
        pruned pages can be handed back to the filesystem afterwards."""
        mode = connection.execute("PRAGMA auto_vacuum").fetchone()[0]
        if mode == 2:
            return
        self.log.info("store {path}: switching to incremental vacuum (one full VACUUM)",
                      path=self.path)
        try:
            connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
            connection.execute("VACUUM")
        except sqlite3.Error as error:
            raise StoreError(f"cannot vacuum the store {self.path}: {error}") from error

    def _migrate(self, connection: sqlite3.Connection, version: int, fresh: bool) -> None:
        """Bring a store from ``version`` to ``SCHEMA_VERSION``, one transaction per step."""
        for target in range(version + 1, SCHEMA_VERSION + 1):
            try:
                connection.execute("BEGIN")
                for statement in _MIGRATIONS[target]:
                    connection.execute(statement)
                connection.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                                   (str(target),))
                connection.execute("COMMIT")
            except sqlite3.Error as error:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise StoreError(f"cannot migrate the store {self.path} to schema {target}: "
                                 f"{error}") from error
            if not fresh:
                self.log.info("store {path} migrated to schema {version}", path=self.path,
                              version=target)

    async def _stop(self) -> None:
        await self.flushed()
        if self._connection is not None:
            await self._run(self._connection.close)
            self._connection = None
        self.is_open = False
        self._pool.stop()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    def _run(self, function: Callable[[], T]) -> defer.Deferred[T]:
        return threads.deferToThreadPool(self._reactor, self._pool, function)

    # -- the write-behind queue -------------------------------------------------

    def _submit(self, operation: Operation | _TaskPut) -> defer.Deferred[Any]:
        done: defer.Deferred[Any] = defer.Deferred()
        self._queue.append((operation, done))
        if not self._writing:
            self._write_next_batch()
        return done

    def _write_next_batch(self) -> None:
        queued, self._queue = self._queue, []
        batch = []
        for operation, done in queued:
            if isinstance(operation, _TaskPut):
                # The row is final once the put leaves the queue (on the reactor thread).
                operation = functools.partial(_insert_task, row=operation.row)
            batch.append((operation, done))
        self._writing = True
        result = self._run(lambda: self._execute(batch))
        result.addCallbacks(self._batch_done, self._batch_failed, callbackArgs=(batch,),
                            errbackArgs=(batch,))

    def _execute(self, batch: list[tuple[Operation, defer.Deferred[Any]]]) -> list[Any]:
        connection = self._connection
        if connection is None:
            raise StoreError("the store is not open")
        results: list[Any] = []
        connection.execute("BEGIN")
        try:
            for operation, _ in batch:
                try:
                    results.append(operation(connection))
                except sqlite3.Error as error:
                    results.append(Failure(StoreError(f"the store cannot be written: {error}")))
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return results

    def _batch_done(self, results: list[Any], batch: list[tuple[Operation, Any]]) -> None:
        self._finish_batch()
        for (_, done), result in zip(batch, results, strict=True):
            done.callback(result) if not isinstance(result, Failure) else done.errback(result)

    def _batch_failed(self, failure: Failure, batch: list[tuple[Operation, Any]]) -> None:
        # A full disk fails every batch: say so once a minute, not once per batch.
        self.failed_batches += 1
        now = self._reactor.seconds()
        if now - self._last_failure_log >= 60:
            self._last_failure_log = now
            self.log.error("store write failed ({count} failed batches so far): {error}",
                           count=self.failed_batches, error=failure.getErrorMessage())
        failure = Failure(StoreError(f"the store cannot be written: "
                                     f"{failure.getErrorMessage()}"))
        self._finish_batch()
        for _, done in batch:
            done.errback(failure)

    def _finish_batch(self) -> None:
        self._writing = False
        if self._queue:
            self._write_next_batch()
        else:
            self._waiters.fire(_IDLE, None)

    def flushed(self) -> defer.Deferred[None]:
        """Fires once everything queued so far has been committed."""
        if not self._writing and not self._queue:
            return defer.succeed(None)
        return self._waiters.wait(_IDLE)

    # -- tasks ------------------------------------------------------------------

    def put_task(self, task: Task) -> defer.Deferred[None]:
        """Insert or replace a task; the record is snapshotted now, not at commit.

        Two puts of one task with nothing queued between them collapse into one write of
        the newer record (a short task is queued ``running`` and ``succeeded`` at once).
        Only at the tail: moving a task's end ahead of its queued output would let a
        caller see the task finished before its output is stored.
        """
        row = _task_row(task)
        tail = self._queue[-1][0] if self._queue else None
        if isinstance(tail, _TaskPut) and tail.task_id == task.id:
            put = tail
            put.row = row
        else:
            put = _TaskPut(task.id, row)
            self._submit(put).addBoth(self._release_put, put)
        return self._waiters.wait(put)

    def _release_put(self, result: Any, put: _TaskPut) -> None:
        self._waiters.fire(put, result if isinstance(result, Failure) else None)

    def append_output(self, task_id: str, offset: int, stream: str,
                      data: bytes) -> defer.Deferred[None]:
        """Queue a chunk; ``output_backlog`` counts queued bytes until they commit."""
        row = (task_id, offset, stream, data)
        self.output_backlog += len(data)
        done = self._submit(lambda c: c.execute(
            "INSERT OR REPLACE INTO output (task_id, offset, stream, data) VALUES (?, ?, ?, ?)",
            row) and None)
        return done.addBoth(self._committed_output, len(data))

    def _committed_output(self, result: Any, size: int) -> Any:
        self.output_backlog -= size
        backlog = self.output_backlog
        self._waiters.fire(_BACKLOG, None,
                           lambda limit: isinstance(limit, int) and backlog <= limit)
        return result

    def when_backlog_below(self, limit: int) -> defer.Deferred[None]:
        """Fires once queued output bytes are at most ``limit`` (the executor's resume)."""
        if self.output_backlog <= limit:
            return defer.succeed(None)
        return self._waiters.wait(_BACKLOG, limit)

    def get_task(self, task_id: str) -> defer.Deferred[Task | None]:
        def select(connection: sqlite3.Connection) -> Task | None:
            row = connection.execute("SELECT record FROM tasks WHERE id = ?",
                                     (task_id,)).fetchone()
            return task_from_record(row[0]) if row else None
        return self._submit(select)

    def list_tasks(self, state: str | None = None, node_id: str | None = None,
                   limit: int = 100, before: str | None = None) -> defer.Deferred[list[Task]]:
        """Newest first; ``before`` is the id cursor of the previous page."""
        clauses, params = [], []
        if state is not None:
            clauses.append("state = ?")
            params.append(state)
        if node_id is not None:
            clauses.append("node_id = ?")
            params.append(node_id)
        if before is not None:
            clauses.append("id < ?")
            params.append(before)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        sql = f"SELECT record FROM tasks {where} ORDER BY id DESC LIMIT ?"

        def select(connection: sqlite3.Connection) -> list[Task]:
            rows = connection.execute(sql, (*params, limit)).fetchall()
            return [task_from_record(row[0]) for row in rows]
        return self._submit(select)

    def count_by_state(self) -> defer.Deferred[dict[str, int]]:
        def select(connection: sqlite3.Connection) -> dict[str, int]:
            rows = connection.execute("SELECT state, count(*) FROM tasks GROUP BY state")
            return {state: count for state, count in rows}
        return self._submit(select)

    def read_output(self, task_id: str, offset: int = 0,
                    limit: int = 4 * 1024 * 1024) -> defer.Deferred[list[tuple[int, str, bytes]]]:
        """Chunks covering bytes from ``offset`` on (the first may start before it)."""
        def select(connection: sqlite3.Connection) -> list[tuple[int, str, bytes]]:
            # Start at the chunk that holds ``offset``, found through the primary key:
            # a filter on offset + length(data) would scan every chunk of the task.
            rows = connection.execute(
                "SELECT offset, stream, data FROM output WHERE task_id = ? AND offset >= "
                "coalesce((SELECT max(offset) FROM output WHERE task_id = ? AND offset <= ?), 0)"
                " ORDER BY offset", (task_id, task_id, offset))
            chunks, total = [], 0
            for start, stream, data in rows:
                if start + len(data) <= offset:
                    continue  # the chunk before ``offset`` ends exactly at it
                chunks.append((start, stream, bytes(data)))
                total += len(data)
                if total >= limit:
                    break
            return chunks
        return self._submit(select)

    def queued_tasks(self, node_id: str) -> defer.Deferred[list[Task]]:
        """The node's queued tasks in admission order (the scheduler reloads them)."""
        def select(connection: sqlite3.Connection) -> list[Task]:
            rows = connection.execute(
                "SELECT record FROM tasks WHERE node_id = ? AND state = ? ORDER BY queue_seq",
                (node_id, TaskState.QUEUED.value)).fetchall()
            return [task_from_record(row[0]) for row in rows]
        return self._submit(select)

    def find_idempotent(self, key: str, since: float) -> defer.Deferred[Task | None]:
        """The newest task submitted with ``key`` no earlier than ``since``, if any."""
        def select(connection: sqlite3.Connection) -> Task | None:
            rows = connection.execute(
                "SELECT record FROM tasks WHERE idempotency_key = ? ORDER BY id DESC",
                (key,)).fetchall()
            for (record,) in rows:
                task = task_from_record(record)
                if task.created_at >= since:
                    return task
            return None
        return self._submit(select)

    def mark_unfinished_lost(self, node_id: str, reason: str,
                             now: float) -> defer.Deferred[list[Task]]:
        """Tasks of ``node_id`` still running become ``lost`` (never resumed); queued ones
        stay queued for the scheduler."""
        def update(connection: sqlite3.Connection) -> list[Task]:
            rows = connection.execute(
                "SELECT record FROM tasks WHERE node_id = ? AND state = ?",
                (node_id, TaskState.RUNNING.value)).fetchall()
            lost = []
            for (record,) in rows:
                task = task_from_record(record)
                task.state = TaskState.LOST
                task.reason = reason
                task.finished_at = now
                connection.execute(
                    "UPDATE tasks SET state = ?, record = ?, finished_at = ? WHERE id = ?",
                    (task.state.value, task_to_record(task), now, task.id))
                lost.append(task)
            return lost
        return self._submit(update)

    # -- retention ----------------------------------------------------------------

    def prune_batch(self, finished_before: float, size_limit: int | None,
                    batch: int) -> defer.Deferred[PruneBatch]:
        """Delete up to ``batch`` finished tasks and their output, oldest finished first:
        those finished before ``finished_before``, then more while the store's used
        bytes exceed ``size_limit``. Queued and running tasks have no ``finished_at``,
        so they are never candidates. One short transaction, in the write queue."""
        def prune(connection: sqlite3.Connection) -> PruneBatch:
            candidates = connection.execute(
                "SELECT id, finished_at FROM tasks WHERE finished_at IS NOT NULL"
                " ORDER BY finished_at, id LIMIT ?", (batch + 1,)).fetchall()
            used = _used_bytes(connection)
            deleted: list[str] = []
            chunks = 0
            for task_id, finished_at in candidates[:batch]:
                if finished_at >= finished_before and (size_limit is None
                                                       or used <= size_limit):
                    break
                chunks += connection.execute("DELETE FROM output WHERE task_id = ?",
                                             (task_id,)).rowcount
                connection.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
                deleted.append(task_id)
                if size_limit is not None:
                    used = _used_bytes(connection)  # three pragmas: cheap
            more = len(deleted) == batch and len(candidates) > batch
            return PruneBatch(deleted, chunks, _used_bytes(connection), more)
        return self._submit(prune)

    def reclaim(self, pages: int = VACUUM_STEP_PAGES) -> defer.Deferred[int]:
        """Hand up to ``pages`` free pages back to the filesystem; the free pages left.

        Runs between write batches, outside a transaction; the WAL is checkpointed once
        nothing is left, or the file would not shrink until the next automatic one."""
        def vacuum() -> int:
            connection = self._connection
            if connection is None:
                raise StoreError("the store is not open")
            connection.execute(f"PRAGMA incremental_vacuum({int(pages)})").fetchall()
            left = int(connection.execute("PRAGMA freelist_count").fetchone()[0])
            if left == 0:
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            return left
        return self._run(vacuum)

    def size(self) -> defer.Deferred[int]:
        """Bytes the store occupies on disk: the database and its WAL."""
        def measure() -> int:
            total = 0
            for path in (self.path, self.path.with_name(self.path.name + "-wal")):
                try:
                    total += path.stat().st_size
                except FileNotFoundError:
                    pass
            return total
        return self._run(measure)

    # -- peers (the discovery layer's PeerStore) --------------------------------

    def load_peers(self) -> defer.Deferred[list[dict[str, Any]]]:
        def select(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            return [json.loads(row[0]) for row in connection.execute("SELECT record FROM peers")]
        return self._submit(select)

    def save_peers(self, peers: list[dict[str, Any]]) -> defer.Deferred[None]:
        rows = [(peer["node_id"], json.dumps(peer)) for peer in peers]

        def replace(connection: sqlite3.Connection) -> None:
            connection.execute("DELETE FROM peers")
            connection.executemany("INSERT INTO peers (node_id, record) VALUES (?, ?)", rows)
        return self._submit(replace)

    # -- suites' recorded durations (oxide_cluster.suites) ------------------------

    def get_suite_durations(self, suite: str) -> defer.Deferred[dict[str, float] | None]:
        def select(connection: sqlite3.Connection) -> dict[str, float] | None:
            row = connection.execute("SELECT durations FROM suite_durations WHERE suite = ?",
                                     (suite,)).fetchone()
            return None if row is None else dict(json.loads(row[0]))
        return self._submit(select)

    def put_suite_durations(self, suite: str, durations: dict[str, float]
                            ) -> defer.Deferred[None]:
        text = json.dumps(durations, separators=(",", ":"), sort_keys=True)

        def replace(connection: sqlite3.Connection) -> None:
            connection.execute("INSERT OR REPLACE INTO suite_durations VALUES (?, ?)",
                               (suite, text))
        return self._submit(replace)

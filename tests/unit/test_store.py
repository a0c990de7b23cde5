from __future__ import annotations

import sqlite3

import pytest
import pytest_twisted
from twisted.internet import defer

from oxide_cluster.model import Task, TaskState
from oxide_cluster.store import SCHEMA_VERSION, Store, StoreError


def make_task(task_id, state=TaskState.RUNNING, node_id="n1"):
    return Task(id=task_id, node_id=node_id, command="ls", args=["-l"], cwd=None, env={},
                secret_env_keys=[], labels={"a": "b"}, timeout=5.0, idle_timeout=None,
                retries=0, state=state, created_at=1.0)


async def opened_store(path):
    from twisted.internet import reactor

    store = Store(reactor, path)
    store.startService()
    await store.opened
    return store


@pytest_twisted.ensureDeferred
async def test_tasks_round_trip_and_list_newest_first(tmp_path):
    store = await opened_store(tmp_path / "s.db")
    try:
        await defer.gatherResults([store.put_task(make_task(f"t{i}")) for i in range(5)])
        again = await store.get_task("t3")
        assert again == make_task("t3")
        page = await store.list_tasks(limit=2)
        assert [t.id for t in page] == ["t4", "t3"]
        rest = await store.list_tasks(limit=10, before="t3")
        assert [t.id for t in rest] == ["t2", "t1", "t0"]
        assert await store.get_task("missing") is None
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_output_chunks_read_from_any_offset(tmp_path):
    store = await opened_store(tmp_path / "s.db")
    try:
        writes = [store.append_output("t1", 0, "stdout", b"hello "),
                  store.append_output("t1", 6, "stderr", b"world")]
        await defer.gatherResults(writes)
        chunks = await store.read_output("t1", 0)
        assert chunks == [(0, "stdout", b"hello "), (6, "stderr", b"world")]
        assert await store.read_output("t1", 7) == [(6, "stderr", b"world")]
        assert await store.read_output("t1", 11) == []
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_unfinished_tasks_become_lost_and_survive_reopen(tmp_path):
    path = tmp_path / "s.db"
    store = await opened_store(path)
    await store.put_task(make_task("run", TaskState.RUNNING))
    await store.put_task(make_task("done", TaskState.SUCCEEDED))
    await store.put_task(make_task("other", TaskState.RUNNING, node_id="n2"))
    await store.stopService()

    store = await opened_store(path)
    try:
        lost = await store.mark_unfinished_lost("n1", "agent restart", 9.0)
        assert [t.id for t in lost] == ["run"]
        run = await store.get_task("run")
        assert run.state is TaskState.LOST and run.reason == "agent restart"
        assert (await store.get_task("done")).state is TaskState.SUCCEEDED
        assert (await store.get_task("other")).state is TaskState.RUNNING
        assert await store.count_by_state() == {"lost": 1, "succeeded": 1, "running": 1}
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_peers_replace_and_load(tmp_path):
    store = await opened_store(tmp_path / "s.db")
    try:
        await store.save_peers([{"node_id": "a", "x": 1}, {"node_id": "b"}])
        await store.save_peers([{"node_id": "b", "y": 2}])
        assert await store.load_peers() == [{"node_id": "b", "y": 2}]
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "s.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    connection.execute("INSERT INTO meta VALUES ('schema_version', ?)",
                       (str(SCHEMA_VERSION + 1),))
    connection.commit()
    connection.close()
    from twisted.internet import reactor

    store = Store(reactor, path)
    store.startService()
    with pytest.raises(StoreError, match="newer"):
        await store.opened
    await store.stopService()


@pytest_twisted.ensureDeferred
async def test_unopenable_path_gives_store_error(tmp_path):
    from twisted.internet import reactor

    store = Store(reactor, tmp_path / "missing-dir" / "s.db")
    store.startService()
    with pytest.raises(StoreError, match="cannot open"):
        await store.opened
    await store.stopService()


@pytest_twisted.ensureDeferred
async def test_many_writes_are_batched_and_all_committed(tmp_path):
    store = await opened_store(tmp_path / "s.db")
    try:
        writes = [store.append_output("t", i, "stdout", b"x") for i in range(2000)]
        await defer.gatherResults(writes)
        chunks = await store.read_output("t", 0, limit=10**9)
        assert [c[0] for c in chunks] == list(range(2000))
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_queued_puts_of_one_task_collapse_to_the_newest(tmp_path):
    store = await opened_store(tmp_path / "s.db")
    try:
        task = make_task("t", TaskState.RUNNING)
        first = store.put_task(task)  # starts a batch at once
        task.state = TaskState.RUNNING
        second = store.put_task(task)  # waits in the queue
        task.state = TaskState.SUCCEEDED
        third = store.put_task(task)  # joins the waiting put
        assert len(store._queue) == 1  # one queued write for both
        await defer.gatherResults([first, second, third])
        assert (await store.get_task("t")).state is TaskState.SUCCEEDED
        task.state = TaskState.FAILED
        await store.put_task(task)
        assert (await store.get_task("t")).state is TaskState.FAILED
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_task_end_never_overtakes_its_queued_output(tmp_path):
    store = await opened_store(tmp_path / "s.db")
    try:
        task = make_task("t", TaskState.RUNNING)
        order = []
        store.put_task(task)  # starts a batch at once
        store.put_task(task).addCallback(lambda _: order.append("running"))
        store.append_output("t", 0, "stdout", b"out").addCallback(
            lambda _: order.append("output"))
        task.state = TaskState.SUCCEEDED
        ended = store.put_task(task).addCallback(lambda _: order.append("ended"))
        await ended
        assert order == ["running", "output", "ended"]
        assert (await store.get_task("t")).state is TaskState.SUCCEEDED
    finally:
        await store.stopService()


_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks (id TEXT PRIMARY KEY, node_id TEXT NOT NULL, state TEXT NOT NULL,
                    record TEXT NOT NULL);
CREATE INDEX tasks_by_state ON tasks (state, id);
CREATE TABLE output (task_id TEXT NOT NULL, offset INTEGER NOT NULL, stream TEXT NOT NULL,
                     data BLOB NOT NULL, PRIMARY KEY (task_id, offset)) WITHOUT ROWID;
CREATE TABLE peers (node_id TEXT PRIMARY KEY, record TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
"""


@pytest_twisted.ensureDeferred
async def test_a_version_1_store_is_migrated_and_keeps_its_tasks(tmp_path):
    path = tmp_path / "s.db"
    connection = sqlite3.connect(path)
    connection.executescript(_V1_SCHEMA)
    # A record written by the previous agent: none of the scheduler's fields.
    old = ('{"id":"old","node_id":"n1","command":"ls","args":[],"cwd":null,"env":{},'
           '"secret_env_keys":[],"labels":{},"timeout":5.0,"idle_timeout":null,"retries":0,'
           '"state":"succeeded","created_at":1.0}')
    connection.execute("INSERT INTO tasks VALUES ('old', 'n1', 'succeeded', ?)", (old,))
    connection.commit()
    connection.close()

    store = await opened_store(path)
    try:
        task = await store.get_task("old")
        assert task.state is TaskState.SUCCEEDED and task.priority == 0 and task.group is None
        queued = make_task("q", TaskState.QUEUED)
        queued.idempotency_key, queued.queue_seq, queued.priority = "k1", 3, 7
        await store.put_task(queued)
        assert await store.find_idempotent("k1", since=0.0) == queued
        assert await store.find_idempotent("k1", since=2.0) is None  # older than the window
        assert await store.queued_tasks("n1") == [queued]
    finally:
        await store.stopService()
    check = sqlite3.connect(path)
    try:
        version = check.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        assert version.fetchone() == (str(SCHEMA_VERSION),) and SCHEMA_VERSION == 4
        columns = {row[1] for row in check.execute("PRAGMA table_info(tasks)")}
        assert {"priority", "task_group", "queue_seq", "idempotency_key",
                "finished_at"} <= columns
        # Retention's clock is backfilled: a finished task without a finish time is oldest.
        assert check.execute("SELECT finished_at FROM tasks WHERE id = 'old'").fetchone() \
            == (0,)
        assert check.execute("SELECT finished_at FROM tasks WHERE id = 'q'").fetchone() \
            == (None,)
        # The one VACUUM that lets pruned pages go back to the filesystem has run.
        assert check.execute("PRAGMA auto_vacuum").fetchone() == (2,)
        row = check.execute("SELECT priority, task_group, queue_seq, idempotency_key FROM tasks"
                            " WHERE id = 'q'").fetchone()
        assert row == (7, None, 3, "k1")
    finally:
        check.close()


@pytest_twisted.ensureDeferred
async def test_queued_tasks_stay_queued_on_restart_and_load_in_admission_order(tmp_path):
    store = await opened_store(tmp_path / "s.db")
    try:
        for task_id, seq in (("b", 2), ("a", 1), ("c", 0)):
            task = make_task(task_id, TaskState.QUEUED)
            task.queue_seq = seq
            await store.put_task(task)
        await store.put_task(make_task("run", TaskState.RUNNING))
        lost = await store.mark_unfinished_lost("n1", "agent restart", 9.0)
        assert [t.id for t in lost] == ["run"]
        assert [t.id for t in await store.queued_tasks("n1")] == ["c", "a", "b"]
        assert await store.queued_tasks("n2") == []
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_waiter_that_gives_up_leaves_at_once_and_the_others_still_fire(tmp_path):
    store = await opened_store(tmp_path / "s.db")
    try:
        writes = [store.append_output("t", i, "stdout", b"x" * 100) for i in range(50)]
        given_up = store.when_backlog_below(0)
        kept = store.when_backlog_below(0)
        flushed, abandoned = store.flushed(), store.flushed()
        assert store._waiters.count() == 4
        given_up.cancel()
        abandoned.cancel()
        given_up.addErrback(lambda failure: failure.trap(defer.CancelledError))
        abandoned.addErrback(lambda failure: failure.trap(defer.CancelledError))
        assert store._waiters.count() == 2  # not kept until the backlog drains
        await defer.gatherResults([*writes, kept, flushed])
        assert store.output_backlog == 0 and store._waiters.count() == 0
    finally:
        await store.stopService()

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

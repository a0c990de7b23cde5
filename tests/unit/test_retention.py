"""Retention against a real SQLite store; a task.Clock drives the pass timer."""

from __future__ import annotations

import os

import pytest_twisted
from twisted.internet import defer, task

from oxide_cluster import config
from oxide_cluster.model import Task, TaskState
from oxide_cluster.retention import Retention
from oxide_cluster.store import Store

DAY = 86400.0
NOW = 1000 * DAY


def make_task(task_id: str, state: TaskState, finished_at: float | None = None,
              created_at: float = NOW - 30 * DAY) -> Task:
    return Task(id=task_id, node_id="n1", command="true", args=[], cwd=None, env={},
                secret_env_keys=[], labels={}, timeout=5.0, idle_timeout=None, retries=0,
                state=state, created_at=created_at, finished_at=finished_at)


async def opened_store(path):
    from twisted.internet import reactor

    store = Store(reactor, path)
    store.startService()
    await store.opened
    return store


async def add(store: Store, tasks: list[Task], output: int = 0) -> None:
    writes = []
    for item in tasks:
        writes.append(store.put_task(item))
        if output:
            writes.append(store.append_output(item.id, 0, "stdout", os.urandom(output)))
    await defer.gatherResults(writes)


def clock_at(now: float) -> task.Clock:
    clock = task.Clock()
    clock.advance(now)
    return clock


@pytest_twisted.ensureDeferred
async def test_old_finished_tasks_go_and_queued_or_running_stay(tmp_path):
    store = await opened_store(tmp_path / "s.db")
    forgotten: list[str] = []

    async def forget(task_ids: list[str]) -> None:
        forgotten.extend(task_ids)

    clock = clock_at(NOW)
    retention = Retention(clock, store, keep_tasks=14 * DAY, store_limit=None,
                          interval=60.0, batch=2, forget=forget)
    try:
        await add(store, [
            make_task("old-ok", TaskState.SUCCEEDED, NOW - 15 * DAY),
            make_task("old-failed", TaskState.FAILED, NOW - 20 * DAY),
            make_task("old-lost", TaskState.LOST, NOW - 14 * DAY - 1),
            make_task("young", TaskState.SUCCEEDED, NOW - 13 * DAY),
            # Created long ago, not finished: never candidates, whatever their age.
            make_task("queued", TaskState.QUEUED),
            make_task("running", TaskState.RUNNING),
        ], output=100)
        retention.startService()  # the TimerService's first pass runs at once
        report = await retention.prune()  # joins that pass
        assert report.tasks == 3 and report.output_chunks == 3
        assert report.batches == 2  # batch=2: three tasks took two transactions
        assert sorted(forgotten) == ["old-failed", "old-lost", "old-ok"]
        left = {t.id for t in await store.list_tasks(limit=100)}
        assert left == {"young", "queued", "running"}
        assert await store.read_output("old-ok") == []
        assert len(await store.read_output("young")) == 1

        # Two days on, the timer's next pass takes "young" (now 15 days finished).
        clock.advance(2 * DAY)
        report = await retention.prune()
        assert report.tasks == 1 and retention.pruned_total == 4
        left = {t.id for t in await store.list_tasks(limit=100)}
        assert left == {"queued", "running"}
        assert retention.to_json()["last_prune"]["tasks"] == 1
    finally:
        await retention.stopService()
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_timer_runs_a_pass_every_interval(tmp_path):
    store = await opened_store(tmp_path / "s.db")
    clock = clock_at(NOW)
    retention = Retention(clock, store, keep_tasks=DAY, store_limit=None, interval=60.0)
    try:
        retention.startService()
        await retention.prune()
        passes = retention.passes
        await add(store, [make_task("old", TaskState.SUCCEEDED, NOW - 2 * DAY)])
        clock.advance(59)
        assert retention.passes == passes  # not yet
        clock.advance(1)
        await retention.prune()  # the timer's pass (joined), then possibly one more
        assert await store.get_task("old") is None
        assert retention.pruned_total == 1
    finally:
        await retention.stopService()
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_store_limit_deletes_oldest_finished_first_until_within_budget(tmp_path):
    store = await opened_store(tmp_path / "s.db")
    clock = clock_at(NOW)
    # 200 young finished tasks with 8 KiB of output each (about 1.7 MB), a queued one.
    tasks = [make_task(f"t{i:03d}", TaskState.SUCCEEDED, NOW - 1000 + i) for i in range(200)]
    await add(store, tasks, output=8192)
    await add(store, [make_task("queued", TaskState.QUEUED)], output=8192)
    limit = 800 * 1024
    retention = Retention(clock, store, keep_tasks=14 * DAY, store_limit=limit, batch=16)
    try:
        report = await retention.prune()
        assert report.used_bytes <= limit
        left = sorted(t.id for t in await store.list_tasks(limit=1000))
        assert "queued" in left
        finished_left = [task_id for task_id in left if task_id != "queued"]
        # Oldest first: what is left is the newest run of tasks, and no more went than
        # needed (one task more would have fit at most 8 KiB and a few pages).
        assert finished_left == [f"t{i:03d}" for i in range(200 - len(finished_left), 200)]
        assert 60 <= len(finished_left) < 100
        assert report.tasks == 200 - len(finished_left)
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_big_prune_gives_the_space_back_to_the_filesystem(tmp_path):
    path = tmp_path / "s.db"
    store = await opened_store(path)
    clock = clock_at(NOW)
    tasks = [make_task(f"t{i:04d}", TaskState.SUCCEEDED, NOW - 20 * DAY) for i in range(1500)]
    await add(store, tasks, output=16 * 1024)
    await add(store, [make_task("young", TaskState.SUCCEEDED, NOW - DAY)], output=16 * 1024)
    await store.flushed()
    before = os.path.getsize(path) + os.path.getsize(f"{path}-wal")
    retention = Retention(clock, store, keep_tasks=14 * DAY, store_limit=None)
    try:
        report = await retention.prune()
        after = os.path.getsize(path) + os.path.getsize(f"{path}-wal")
        assert report.tasks == 1500
        assert before > 24 * 1024 * 1024
        assert after < before / 10, (before, after)
        assert report.file_bytes == after
        assert len(await store.read_output("young")) == 1
    finally:
        await store.stopService()


def test_config_reads_durations_and_sizes():
    loaded = config.load({"keep_tasks": "14d", "store_limit": "10G"}, {})
    assert loaded.keep_tasks == 14 * DAY and loaded.store_limit == 10 * 1024 ** 3
    assert config.load({}, {"OXIDE_KEEP_TASKS": "90m"}).keep_tasks == 5400.0
    assert config.load({}, {}).store_limit is None  # a tenth of the disk, at start
    for bad in ("soon", "-1d", "0"):
        try:
            config.load({"keep_tasks": bad}, {})
        except config.ConfigError as error:
            assert "keep_tasks" in str(error)
        else:
            raise AssertionError(f"{bad!r} was accepted")


@pytest_twisted.ensureDeferred
async def test_metrics_count_pruned_tasks_and_the_last_pass(tmp_path):
    from oxide_cluster.metrics import _retention_metrics

    store = await opened_store(tmp_path / "s.db")
    retention = Retention(clock_at(NOW), store, keep_tasks=DAY, store_limit=None)
    try:
        await add(store, [make_task("old", TaskState.SUCCEEDED, NOW - 2 * DAY)], output=10)
        await retention.prune()
        samples = {sample.name: sample.value for metric in _retention_metrics(retention)
                   for sample in metric.samples}
        assert samples["oxide_store_pruned_tasks_total"] == 1
        assert samples["oxide_store_last_prune_timestamp"] == NOW
        assert samples["oxide_store_bytes"] == retention.last.file_bytes > 0
    finally:
        await store.stopService()


def test_no_pass_runs_while_the_store_is_not_open(tmp_path):
    from twisted.internet import reactor

    store = Store(reactor, tmp_path / "s.db")  # never started: a store that failed to open
    clock = clock_at(NOW)
    retention = Retention(clock, store, keep_tasks=DAY, store_limit=None, interval=60.0)
    retention.startService()
    clock.advance(60)
    assert retention.passes == 0 and retention.last is None
    retention.stopService()


@pytest_twisted.ensureDeferred
async def test_the_first_pass_runs_as_soon_as_the_store_opens_not_an_interval_later(tmp_path):
    from twisted.internet import reactor

    first = await opened_store(tmp_path / "s.db")
    await add(first, [make_task("old", TaskState.SUCCEEDED, NOW - 20 * DAY)])
    await first.stopService()
    store = Store(reactor, tmp_path / "s.db")
    retention = Retention(clock_at(NOW), store, keep_tasks=14 * DAY, store_limit=None,
                          interval=60.0)
    store.startService()
    retention.startService()  # its first tick finds the store still opening
    try:
        assert not store.is_open
        await store.opened
        for _ in range(200):  # the Clock never moves: only the open can have started it
            if retention.last is not None:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert retention.last is not None and retention.last.tasks == 1
    finally:
        await retention.stopService()
        if retention.last is None:
            await retention.prune()  # let the store close with no pass on its queue
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_caller_that_gives_up_leaves_and_the_pass_it_started_is_still_joined(
        tmp_path):
    store = await opened_store(tmp_path / "s.db")
    retention = Retention(clock_at(NOW), store, keep_tasks=14 * DAY, store_limit=None)
    try:
        await add(store, [make_task("old", TaskState.SUCCEEDED, NOW - 15 * DAY)])
        first = retention.prune()
        first.cancel()  # e.g. its request timed out
        first.addErrback(lambda failure: failure.trap(defer.CancelledError))
        assert retention._waiters.count() == 0
        joined = retention.prune()  # the pass is still running: joined, not doubled
        report = await joined
        assert report.tasks == 1 and retention.passes == 1
    finally:
        await store.stopService()

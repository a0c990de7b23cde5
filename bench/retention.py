"""Retention: store size and prune time after N finished tasks with 4 KiB of output each,
and the latency of task writes while the prune runs.

    python -m bench.retention [--tasks 100000] [--output 4096]

Not yet a section of ``python -m bench``; prints its rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, reactor, task

from oxide_cluster.model import Task, TaskState
from oxide_cluster.retention import Retention
from oxide_cluster.store import Store

DAY = 86400.0


def _task(index: int, finished_at: float) -> Task:
    return Task(id=f"{index:012x}-bench", node_id="bench", command="true", args=[], cwd=None,
                env={}, secret_env_keys=[], labels={}, timeout=60.0, idle_timeout=None,
                retries=0, state=TaskState.SUCCEEDED, created_at=finished_at - 1,
                finished_at=finished_at, output_bytes=0)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


async def run(count: int, output: int, writes_during: bool) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="oxide-retention-"))
    path = workdir / "oxide.sqlite3"
    store = Store(reactor, path)
    store.startService()
    await store.opened
    now = 1000 * DAY
    data = os.urandom(output)
    filled = time.perf_counter()
    for start in range(0, count, 1000):
        writes = []
        for index in range(start, min(count, start + 1000)):
            writes.append(store.put_task(_task(index, now - 20 * DAY)))
            writes.append(store.append_output(f"{index:012x}-bench", 0, "stdout", data))
        await defer.gatherResults(writes)
    fill_seconds = time.perf_counter() - filled
    before = _size(path)

    clock = task.Clock()
    clock.advance(now)
    retention = Retention(clock, store, keep_tasks=14 * DAY, store_limit=None)
    latencies: list[float] = []
    pruning = retention.prune()
    index = count
    while writes_during and not pruning.called:  # one task write at a time
        index += 1
        sent = time.perf_counter()
        await store.put_task(_task(index, now))
        latencies.append(time.perf_counter() - sent)
    report = await pruning
    after = _size(path)
    await store.stopService()
    latencies.sort()
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)] if latencies else 0.0
    print(f"tasks stored                 {count} x {output} B output "
          f"(fill {fill_seconds:.1f} s)")
    print(f"store before prune           {before / 2**20:.1f} MiB")
    print(f"prune pass                   {report.seconds:.2f} s, {report.tasks} tasks, "
          f"{report.batches} batches ({count / report.seconds:.0f} tasks/s)")
    print(f"store after prune            {after / 2**20:.2f} MiB")
    if latencies:
        print(f"task write during prune      n={len(latencies)} p50 "
              f"{statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
              f"max {latencies[-1] * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--output", type=int, default=4096)
    parser.add_argument("--no-writes", action="store_true",
                        help="prune alone, without task writes racing it")
    options = parser.parse_args()
    task.react(lambda _: defer.Deferred.fromCoroutine(
        run(options.tasks, options.output, not options.no_writes)))


if __name__ == "__main__":
    main()

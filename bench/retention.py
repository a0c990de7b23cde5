"""Retention: store size and prune time after N finished tasks with 4 KiB of output each,
and the latency of task writes while the prune runs.

    python -m bench.retention [--tasks 100000] [--output 4096]   # the store alone
    python -m bench.retention --agent [--tasks 100000]           # the suite's section

With ``--agent`` (the ``retention`` section of ``python -m bench``): a state dir is filled
with N tasks finished 20 days ago (past ``keep_tasks``), a real agent starts on it (its
first retention pass runs at start) and one client runs ``/bin/true`` through the task API
(``POST /execute?wait``) while the prune runs; the baseline is the same calls once the
prune is over. Rows: store size before and after, the prune's time, and the API's p50/p99
during and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task

from oxide_cluster.model import Task, TaskState
from oxide_cluster.retention import Retention
from oxide_cluster.store import Store

DAY = 86400.0


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * fraction + 0.5) - 1)] if ordered else 0.0


async def fill(path: Path, count: int, output: int, finished_at: float) -> None:
    """A store holding ``count`` finished tasks with ``output`` bytes each."""
    store = Store(reactor, path)
    store.startService()
    await store.opened
    data = os.urandom(output)
    for start in range(0, count, 1000):
        writes = []
        for index in range(start, min(count, start + 1000)):
            writes.append(store.put_task(_task(index, finished_at)))
            writes.append(store.append_output(f"{index:012x}-bench", 0, "stdout", data))
        await defer.gatherResults(writes)
    await store.stopService()


def measure_agent(count: int, output: int = 4096) -> dict[str, Any]:
    """The suite's figures: a real agent pruning ``count`` old tasks at start."""
    from bench.common import Client, LocalAgent, run_true

    agent = LocalAgent()
    state = agent.home / "state"
    state.mkdir(mode=0o700)
    path = state / "oxide.sqlite3"
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench.retention", "--fill", str(path),
                    "--tasks", str(count), "--output", str(output)], check=True)
    fill_seconds = time.perf_counter() - began
    before = _size(path)
    during: list[float] = []
    after: list[float] = []
    with agent:
        done = threading.Event()
        last: dict[str, Any] = {}

        def watch() -> None:
            client = Client(agent.port)
            while not done.is_set():
                store = client.call("GET", "/stats")[1].get("store") or {}
                if store.get("last_prune"):
                    last.update(store["last_prune"])
                    done.set()
                    return
                time.sleep(0.05)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        client = Client(agent.port)
        while not done.is_set():
            sent = time.perf_counter()
            run_true(client)
            during.append(time.perf_counter() - sent)
        watcher.join(5)
        for _ in range(max(50, len(during))):
            sent = time.perf_counter()
            run_true(client)
            after.append(time.perf_counter() - sent)
        size_after = _size(path)
    return {"tasks": count, "output": output, "fill_s": fill_seconds, "before_bytes": before,
            "after_bytes": size_after, "prune": last, "api_during_s": during,
            "api_after_s": after}


def rows(figures: dict[str, Any]) -> list[list[str]]:
    """Rows of ``python -m bench``'s table."""
    prune = figures["prune"]
    during, after = figures["api_during_s"], figures["api_after_s"]
    count = figures["tasks"]
    return [
        ["retention", f"store after {count} tasks x {figures['output'] // 1024} KiB output",
         f"{figures['before_bytes'] / 2**20:.0f} MiB", "-", "-", "-", "-"],
        ["retention", f"prune of {prune.get('tasks', 0)} tasks at start (store after it)",
         f"{prune.get('seconds', 0.0):.1f} s ({prune.get('file_bytes', 0) / 2**20:.1f} MiB)",
         "-", "-", "-", "-"],
        ["retention", f"task API p99 during the prune (n={len(during)})",
         f"{_percentile(during, 0.99) * 1000:.1f} ms", "no prune running",
         f"{_percentile(after, 0.99) * 1000:.1f} ms",
         f"{_percentile(during, 0.99) / max(_percentile(after, 0.99), 1e-9):.2f}", "-"],
        ["retention", "task API p50 during the prune",
         f"{statistics.median(during) * 1000:.1f} ms" if during else "-", "no prune running",
         f"{statistics.median(after) * 1000:.1f} ms" if after else "-", "-", "-"],
    ]


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
    parser.add_argument("--agent", action="store_true",
                        help="a real agent prunes at start; the task API's latency meanwhile")
    parser.add_argument("--fill", metavar="PATH", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.fill:
        finished = time.time() - 20 * DAY
        task.react(lambda _: defer.Deferred.fromCoroutine(
            fill(Path(options.fill), options.tasks, options.output, finished)))
    if options.agent:
        from bench.common import print_table

        print_table("retention", ["section", "measure", "oxide", "baseline",
                                  "baseline value", "ratio", "goal"],
                    rows(measure_agent(options.tasks, options.output)))
        return
    task.react(lambda _: defer.Deferred.fromCoroutine(
        run(options.tasks, options.output, not options.no_writes)))


if __name__ == "__main__":
    main()

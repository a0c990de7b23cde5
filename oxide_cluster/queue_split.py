"""``run --parallel N --split GLOB --queue-split``: N workers take batches of files from a
queue until it is empty, so a slow file never leaves the other workers idle.

The design, chosen as the simplest that is robust: the queue is held by the CLI and every
batch is one task of the cluster. Each of the N worker threads keeps one batch task in the
pool at a time: it takes the next batch, submits it (the one uploaded workspace, the
command with the batch's files in place of ``{files}``), follows it like a shard, and takes
the next when it has ended. The cluster places each batch on whichever node has room, so
a faster node takes more batches. The task is the batch's lease: a task that ends ``lost``
(its node died; the cluster's retries come first) or killed by a signal (the OOM killer,
``kill -9``) gives its batch back to the queue, where any worker takes it again (at most
:data:`MAX_RETURNS` times; then it counts as failed). A batch that ran to its end, its
tests passing or not, is done. So every file runs to completion in exactly one batch
task; a returned batch's output has been streamed, and its reports are left out of the
merge. Nothing is added to the node's API: no queue state on a node that could die, no
per-run token handed to tasks. The cost is one task submission per batch, which is why
batches are large at first: a batch is the costliest files first until it holds
``remaining / (4N)`` of the expected time (durations, else sizes), never less than
``total / (8N)``, so the first batches are a quarter of a worker's share and they shrink
toward the end, where small batches even out the workers' finishing times.

Every batch also pays its runner's start-up (interpreter, imports, collection), which
neither durations nor sizes show. Each batch that ran to its end with a JUnit report tells
it: its task's wall time minus the test time its report sums is its start-up, and that
test time over the batch's expected cost converts costs to seconds. From those estimates
(the median start-up), a new batch holds at least enough tests that the start-up stays
under :data:`STARTUP_SHARE` of the batch's time, but never more than a worker's share of
what is left (``remaining / N``), so the end still evens out.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from oxide_cluster import split as splitting
from oxide_cluster.cli import EXIT_CANCELLED, Failed, Interrupted, _node_failure, request_body
from oxide_cluster.client import Node, NodeError
from oxide_cluster.fanout import (
    CANCEL_WAIT,
    Shard,
    ShardOutput,
    _cancel,
    _plan,
    _report,
    _run_shard,
    _say,
    junit_reports,
    new_run_id,
    substitute,
)
from oxide_cluster.workspace_client import junit_summary

MAX_RETURNS = 2
START_SHARE = 4  # a batch holds remaining / (START_SHARE * N) of the expected time
FLOOR_SHARE = 8  # and never less than total / (FLOOR_SHARE * N)
STARTUP_SHARE = 0.15  # start-up at most this share of a batch's time (start-up + tests)


@attrs.frozen
class Batch:
    """Files taken together; ``returns``: how often they came back from a dead task."""

    number: int
    files: list[str]
    returns: int = 0


class FileQueue:
    """The files not yet run, handed out in batches that shrink as the queue empties.

    ``take`` blocks while the queue is empty but batches are still out (one may come
    back); it returns None once everything is done, or after ``close``."""

    def __init__(self, costs: Mapping[str, float], workers: int,
                 max_returns: int = MAX_RETURNS) -> None:
        if workers < 1:
            raise ValueError("at least one worker")
        total = sum(costs.values())
        self._costs = dict(costs) if total > 0 else {name: 1.0 for name in costs}
        self._total = sum(self._costs.values())
        self._remaining = self._total
        self._pending = collections.deque(
            sorted(self._costs, key=lambda name: (-self._costs[name], name)))
        self._returned: collections.deque[Batch] = collections.deque()
        self._workers = workers
        self._max_returns = max_returns
        self._out = 0
        self._numbers = 0
        self._closed = False
        self._condition = threading.Condition()
        self._startups: list[float] = []
        self._tested = 0.0  # seconds of tests, in the batches observed
        self._tested_cost = 0.0  # and what they were expected to cost

    def target(self) -> float:
        """The expected cost the next new batch should hold."""
        share = self._remaining / (START_SHARE * self._workers)
        target = max(share, self._total / (FLOOR_SHARE * self._workers))
        startup = self.startup()
        if startup is None or self._tested <= 0 or self._tested_cost <= 0:
            return target
        # tests >= startup * (1 - s) / s keeps startup / (startup + tests) <= s; in cost
        # units through the seconds per unit of cost measured so far.
        seconds_per_cost = self._tested / self._tested_cost
        if seconds_per_cost <= 0:  # an underflow of absurd timings: no conversion
            return target
        enough = startup * (1 - STARTUP_SHARE) / STARTUP_SHARE / seconds_per_cost
        return max(target, min(enough, self._remaining / self._workers))

    def startup(self) -> float | None:
        """The median start-up of the batches observed (None before the first)."""
        with self._condition:
            if not self._startups:
                return None
            return statistics.median(self._startups)

    def observe(self, files: Sequence[str], wall: float, tested: float) -> None:
        """A batch of ``files`` ran to its end in ``wall`` seconds on its node, of which
        its JUnit report sums ``tested`` seconds of tests: the rest was start-up."""
        if wall <= 0 or tested <= 0:  # a report without times tells nothing
            return
        with self._condition:
            self._startups.append(max(wall - tested, 0.0))
            cost = sum(self._costs.get(name, 0.0) for name in files)
            if cost > 0:
                self._tested += min(tested, wall)
                self._tested_cost += cost

    def take(self, block: bool = True) -> Batch | None:
        """The next batch; without ``block``, None at once when none is there now."""
        with self._condition:
            while True:
                if self._closed:
                    return None
                if self._returned:
                    again = self._returned.popleft()
                    return self._hand_out(again.files, again.returns)
                if self._pending:
                    target, load = self.target(), 0.0
                    files: list[str] = []
                    while self._pending and (not files or load < target):
                        name = self._pending.popleft()
                        files.append(name)
                        load += self._costs[name]
                    self._remaining -= load
                    return self._hand_out(sorted(files), 0)
                if self._out == 0 or not block:
                    return None
                self._condition.wait()

    def _hand_out(self, files: list[str], returns: int) -> Batch:
        self._out += 1
        self._numbers += 1
        return Batch(self._numbers - 1, files, returns)

    def done(self, batch: Batch) -> None:
        """The batch ran to its end (whatever its tests said)."""
        with self._condition:
            self._out -= 1
            self._condition.notify_all()

    def give_back(self, batch: Batch) -> bool:
        """The batch's task died: queue its files again, unless they came back too
        often already (then it is done, as failed). True when queued again."""
        with self._condition:
            self._out -= 1
            self._condition.notify_all()
            if batch.returns >= self._max_returns or self._closed:
                return False
            self._returned.append(Batch(batch.number, batch.files, batch.returns + 1))
            return True

    def close(self) -> None:
        """Hand out nothing more (Ctrl-C, or the cluster refused a batch)."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()


def died(shard: Shard) -> bool:
    """Whether the batch's task ended without running to its own end: lost with its
    node, or killed by a signal. Cancelled (Ctrl-C) is not a death."""
    return shard.state == "lost" or (shard.state == "failed" and shard.signal is not None)


def queue_env(worker: int, workers: int, batch: int) -> dict[str, str]:
    """A batch's environment. No shard variables: a split plugin would split the batch
    again."""
    return {"OXIDE_QUEUE_WORKER": str(worker), "OXIDE_QUEUE_WORKERS": str(workers),
            "OXIDE_QUEUE_BATCH": str(batch)}


@attrs.define
class _Run:
    node: Node
    options: argparse.Namespace
    command: list[str]
    fields: dict[str, Any]
    queue: FileQueue
    workers: int
    artifacts_dir: Path | None
    lock: threading.Lock = attrs.Factory(threading.Lock)
    batches: list[Shard] = attrs.Factory(list)
    returned: set[int] = attrs.Factory(set)
    errors: list[Failed] = attrs.Factory(list)
    run_id: str = attrs.Factory(new_run_id)


def _work(run: _Run, worker: int) -> None:
    """One worker: batch after batch until the queue is empty."""
    while (batch := run.queue.take()) is not None:
        shard = Shard(batch.number, run.workers, batch.files, worker=worker)
        body = request_body(run.options, substitute(run.command, batch.files))
        body["env"] = {**body.get("env", {}),
                       **queue_env(worker, run.workers, batch.number)}
        body.update(run.fields)
        body["fanout"] = {"run": run.run_id, "index": batch.number, "total": run.workers,
                          "mode": "queue"}
        try:
            task = run.node.request("POST", "/execute", body)
        except NodeError as error:
            run.queue.give_back(batch)
            run.queue.close()
            with run.lock:
                run.errors.append(_node_failure(error))
            return
        shard.task_id, shard.node_id = task["id"], task["node_id"]
        with run.lock:
            run.batches.append(shard)
        again = f" (again, {batch.returns})" if batch.returns else ""
        _say(f"[{shard.label}] task {shard.task_id} on node {shard.node_id}: "
             f"{len(batch.files)} files{again}")
        prefix = f"[{shard.label}] ".encode()
        out = ShardOutput(sys.stdout.buffer, prefix, run.lock)
        err = ShardOutput(sys.stderr.buffer, prefix, run.lock)
        try:
            _run_shard(run.node, shard, task, out, err, run.artifacts_dir)
        finally:
            if died(shard) and run.queue.give_back(batch):
                with run.lock:
                    run.returned.add(shard.index)
                _say(f"[{shard.label}] task {shard.task_id} {shard.state}"
                     f"{'' if shard.signal is None else f' (signal {shard.signal})'}: "
                     f"its {len(batch.files)} files go back to the queue")
            elif not died(shard):
                _observe(run, shard)
                run.queue.done(batch)


def _observe(run: _Run, shard: Shard) -> None:
    """Tell the queue what the batch's start-up was, when its run time on the node and
    its JUnit reports say (tests passing or not; not when cancelled or timed out)."""
    if shard.state not in ("succeeded", "failed") or shard.seconds is None \
            or run.artifacts_dir is None or not run.options.junit:
        return
    try:
        reports = junit_reports(shard, run.artifacts_dir, run.options.junit)
    except OSError:
        return
    summaries = [summary for data in reports if (summary := junit_summary(data)) is not None]
    if summaries:
        run.queue.observe(shard.files, shard.seconds, sum(s.time for s in summaries))


def run_queue(node: Node, options: argparse.Namespace, command: list[str]) -> int:
    """``--queue-split``: run the workers, then report like the shards (the exit code is
    the lowest-numbered failing batch's)."""
    if not options.split:
        raise Failed(2, "run: --queue-split needs --split GLOB (the files to queue)")
    if options.group_output:
        raise Failed(2, "run: --queue-split prints batches as they come (no --group-output)")
    began = time.monotonic()
    _, fields, plan = _plan(node, options, command)
    assert plan is not None
    costs, _ = splitting.weights(plan.sizes, plan.durations)
    workers = min(options.parallel, len(costs))
    artifacts_dir = None
    if fields.get("artifacts"):
        artifacts_dir = Path(options.artifacts_dir or os.path.join(
            "oxide-artifacts", options.group or f"queue-{int(time.time())}"))
    run = _Run(node, options, command, fields, FileQueue(costs, workers), workers,
               artifacts_dir)
    threads = [threading.Thread(target=_work, args=(run, worker), daemon=True,
                                name=f"queue-worker-{worker + 1}") for worker in range(workers)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except Interrupted as why:
        _say(f"{why}: cancelling the batches that run")
        run.queue.close()
        with run.lock:
            running = list(run.batches)
        _cancel(node, running)
        deadline = time.monotonic() + CANCEL_WAIT
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        return EXIT_CANCELLED
    if run.errors:
        raise run.errors[0]
    kept = sorted((shard for shard in run.batches if shard.index not in run.returned),
                  key=lambda shard: shard.index)
    wall = time.monotonic() - began
    per_worker = collections.Counter(shard.worker for shard in kept)
    startup = run.queue.startup()
    _say(f"{len(kept)} batches, {len(run.returned)} returned to the queue; per worker: " +
         ", ".join(f"{worker + 1}: {per_worker[worker]}" for worker in range(workers)) +
         ("" if startup is None else f"; start-up ~{startup:.2f}s per batch"))
    return _report(node, kept, options, artifacts_dir, wall, plan)


def batch_sizes(costs: Sequence[float], workers: int, startup: float | None = None,
                seconds_per_cost: float = 1.0) -> list[int]:
    """How many files each batch of a queue of ``costs`` gets, taken one after another
    (for the docs and the tests); with ``startup``, each batch is observed as having
    taken that plus its costs' seconds."""
    names = {f"f{i:06d}": cost for i, cost in enumerate(costs)}
    queue = FileQueue(names, workers)
    sizes = []
    while (batch := queue.take()) is not None:
        sizes.append(len(batch.files))
        if startup is not None:
            tested = sum(names[name] for name in batch.files) * seconds_per_cost
            queue.observe(batch.files, startup + tested, tested)
        queue.done(batch)
    return sizes

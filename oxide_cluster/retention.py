"""Retention: finished tasks and their output are deleted once too old or too many.

A node runs for months and every task leaves a record and up to ``output_limit`` bytes of
output in SQLite. Periodically, finished tasks past ``keep_tasks`` go, and then more of
the oldest while the store holds more than ``store_limit`` bytes. Deletion happens in
small batches through the store's write queue (each one short transaction, so task
writes interleave), then freed pages go back to the filesystem in small vacuum steps.
Queued and running tasks are never candidates: the store has no finish time for them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
from twisted.application import internet, service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from oxide_cluster.clock import Clock
from oxide_cluster.store import PruneBatch
from oxide_cluster.waiters import Waiters

DEFAULT_INTERVAL = 60.0
DEFAULT_BATCH = 200


class PrunableStore(Protocol):
    is_open: bool
    opened: defer.Deferred[Any]

    def prune_batch(self, finished_before: float, size_limit: int | None,
                    batch: int) -> defer.Deferred[PruneBatch]: ...

    def reclaim(self, pages: int = ...) -> defer.Deferred[int]: ...

    def size(self) -> defer.Deferred[int]: ...


@attrs.frozen
class PruneReport:
    """One pass: what went, the store's size after it, and how long it took."""

    at: float
    tasks: int
    output_chunks: int
    batches: int
    used_bytes: int
    file_bytes: int
    seconds: float

    def to_json(self) -> dict[str, float | int]:
        return attrs.asdict(self)


class Retention(service.MultiService):
    """Prunes the store every ``interval`` seconds (a ``TimerService`` child)."""

    log = Logger()

    def __init__(self, clock: Clock, store: PrunableStore, *, keep_tasks: float,
                 store_limit: int | None, interval: float = DEFAULT_INTERVAL,
                 batch: int = DEFAULT_BATCH,
                 forget: Callable[[list[str]], Awaitable[None]] | None = None,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self._clock = clock
        self._store = store
        self.keep_tasks = keep_tasks
        self.store_limit = store_limit
        self.batch = batch
        self._forget = forget  # artifacts of deleted tasks (unpinned, listing removed)
        self._timer = timer
        self.pruned_total = 0
        self.passes = 0
        self.last: PruneReport | None = None
        self._waiters: Waiters[None, PruneReport] = Waiters()
        self._pruning = False
        self._awaiting_open = False
        timer_service = internet.TimerService(interval, self._tick)
        timer_service.clock = clock
        timer_service.setServiceParent(self)

    def to_json(self) -> dict[str, object]:
        """The ``store`` section of ``/stats``: the limits and the last prune."""
        return {"keep_tasks": self.keep_tasks, "store_limit": self.store_limit,
                "pruned_since_start": self.pruned_total,
                "size_bytes": self.last.file_bytes if self.last is not None else None,
                "last_prune": self.last.to_json() if self.last is not None else None}

    def _tick(self) -> defer.Deferred[None]:
        if not self._store.is_open:
            # At start the store is still opening: prune once it is open, not a whole
            # interval later (if it fails to open, start-up ends with its own one line).
            if not self._awaiting_open:
                self._awaiting_open = True
                self._store.opened.addBoth(self._store_opened)
            return defer.succeed(None)
        # TimerService stops for good when its callable fails: log and keep going.
        done = self.prune()
        done.addErrback(lambda failure: self.log.failure("store prune failed", failure))
        return done.addCallback(lambda _: None)

    def _store_opened(self, result: object) -> object:
        if self.running and self._store.is_open:
            self._tick()
        return result  # the store's own callbacks see the result unchanged

    def prune(self) -> defer.Deferred[PruneReport]:
        """One pass now; a pass already running is joined, not doubled."""
        waiter = self._waiters.wait(None)
        if not self._pruning:
            # A flag, not the waiter count: a caller that gave up (cancelled) leaves the
            # helper at once, and the pass it started still runs.
            self._pruning = True
            defer.Deferred.fromCoroutine(self._prune()).addBoth(self._pass_ended)
        return waiter

    def _pass_ended(self, result: PruneReport | Failure) -> None:
        self._pruning = False
        self._waiters.fire(None, result)

    async def _prune(self) -> PruneReport:
        started = self._timer()
        now = self._clock.seconds()
        finished_before = now - self.keep_tasks
        tasks = chunks = batches = 0
        used = 0
        while True:
            batch = await self._store.prune_batch(finished_before, self.store_limit,
                                                  self.batch)
            batches += 1
            tasks += len(batch.task_ids)
            chunks += batch.output_chunks
            used = batch.used_bytes
            if batch.task_ids and self._forget is not None:
                try:
                    await self._forget(batch.task_ids)
                except Exception:
                    self.log.failure("cannot release the artifacts of pruned tasks")
            if not batch.more:
                break
        if tasks:
            while await self._store.reclaim() > 0:
                pass
        report = PruneReport(at=now, tasks=tasks, output_chunks=chunks, batches=batches,
                             used_bytes=used, file_bytes=await self._store.size(),
                             seconds=self._timer() - started)
        self.passes += 1
        self.pruned_total += tasks
        self.last = report
        # One line per pass that deleted something; an idle pass only at debug level.
        emit = self.log.info if tasks else self.log.debug
        emit("store pruned: {tasks} finished tasks, {chunks} output chunks in "
             "{batches} batches, {seconds:.3f} s; store now {file_bytes} bytes",
             tasks=tasks, chunks=chunks, batches=batches, seconds=report.seconds,
             file_bytes=report.file_bytes)
        return report


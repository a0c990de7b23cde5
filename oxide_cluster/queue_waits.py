"""Long-polls on tasks queued in the cluster's Redis queue: fire once a task leaves it.

A ``?wait=S`` on a task queued in Redis has nothing local to wait on: any node may start
it, or the leader may reject it. The cluster has no pub/sub channel for the queue, so one
poll per node asks Redis for the state of every waited-on task in one script (the
``states`` round trip the entering node's watch uses), backing off while nothing moves and
not at all when nobody waits. Waiters are :class:`~oxide_cluster.waiters.Waiters`: one
that times out is unregistered at once.
"""

from __future__ import annotations

from typing import Protocol, cast

from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from oxide_cluster.clock import Clock
from oxide_cluster.cluster_queue import QueueUnavailable
from oxide_cluster.waiters import Waiters

QUEUED = "queued"
# Ids asked about per script: the KEYS of one EVAL stay small.
POLL_BATCH = 500


class QueueStates(Protocol):
    """``cluster_queue.QueueBackend.states``."""

    def states(self, task_ids: list[str]) -> defer.Deferred[list[str | None]]: ...


class QueueWaits:
    """Who waits for which task queued in Redis, and the poll that tells them."""

    log = Logger()

    def __init__(self, reactor: Clock, backend: QueueStates, *, first: float = 0.05,
                 longest: float = 1.0) -> None:
        self._reactor = reactor
        self._backend = backend
        self._first = first
        self._longest = longest
        self._interval = first
        self._waiters: Waiters[str, str | None] = Waiters()
        self._call: DelayedCall | None = None
        self._polling = False
        self.polls = 0

    def left_queue(self, task_id: str, timeout: float) -> defer.Deferred[str | None]:
        """Fires with the task's state in Redis once it is not ``queued`` (``started``,
        ``cancelled``, ``rejected``; None when Redis has no record of it), or with
        ``queued`` once ``timeout`` passes first (and the waiter is forgotten then)."""
        waiter = self._waiters.wait(task_id)
        waiter.addTimeout(timeout, cast(IReactorTime, self._reactor),
                          onTimeoutCancel=lambda _, __: QUEUED)
        waiter.addBoth(self._settled)
        self._interval = self._first  # a new waiter: look soon, then back off again
        if self._call is None and not self._polling:
            self._call = self._reactor.callLater(self._first, self._poll)
        return waiter

    def count(self) -> int:
        """Waiters registered (every one is answered or timed out)."""
        return self._waiters.count()

    @property
    def polling(self) -> bool:
        """A poll is scheduled or under way."""
        return self._call is not None or self._polling

    def _settled(self, result: str | None) -> str | None:
        if not self._waiters.count() and self._call is not None and self._call.active():
            self._call.cancel()  # nobody waits: no poll left behind
            self._call = None
        return result

    def _poll(self) -> None:
        self._call = None
        self._polling = True
        poll = defer.Deferred.fromCoroutine(self._ask())

        def failed(failure: Failure) -> None:
            self.log.warn("cluster queue: polling waited-on tasks failed: {error}",
                          error=failure.getErrorMessage())

        def again(_: object) -> None:
            self._polling = False
            if self._waiters.count() and self._call is None:
                self._call = self._reactor.callLater(self._interval, self._poll)
        poll.addErrback(failed)
        poll.addBoth(again)

    async def _ask(self) -> None:
        ids = self._waiters.keys()
        self.polls += 1
        moved = False
        for start in range(0, len(ids), POLL_BATCH):
            batch = ids[start:start + POLL_BATCH]
            try:
                states = await self._backend.states(batch)
            except QueueUnavailable as error:
                self.log.info("waited-on tasks not polled: {error}", error=error)
                break
            for task_id, state in zip(batch, states, strict=True):
                if state != QUEUED:
                    moved = True
                    self._waiters.fire(task_id, state)
        self._interval = self._first if moved else min(self._interval * 2, self._longest)

"""Drain: a node that takes no new tasks and lets its running ones finish.

One small shared value: the scheduler refuses submissions and starts nothing from its
queue while it is set, the node's announcement carries it (so a leader places elsewhere),
and ``/ready`` answers 503 so that load balancers stop sending work. A drain may have a
``deadline``: the tasks still running then are cancelled (``Scheduler.drain``).

:class:`DrainOnStop` makes a stop (SIGTERM from systemd or ``docker stop``) a drain first:
with ``stop_grace`` > 0, running tasks get that long to finish before the executor
terminates them, so a rolling restart of the pool fails no CI job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

RETRY_AFTER = 30  # seconds a client is told to wait: a drain usually ends in a restart
MAX_DEADLINE = 7 * 86400.0


@attrs.define
class Drain:
    """Whether this node is draining, since when, and when running tasks are cancelled
    (reactor seconds)."""

    draining: bool = False
    since: float | None = None
    deadline: float | None = None

    def to_json(self) -> dict[str, object]:
        from oxide_cluster.model import rfc3339

        return {"draining": self.draining, "since": rfc3339(self.since),
                "deadline": rfc3339(self.deadline)}


class DrainOnStop(service.Service):
    """Added last to the node's services, so it stops first (the API still answers and
    streams output meanwhile): drain, then wait up to ``grace`` seconds for running tasks."""

    log = Logger()

    def __init__(self, reactor: Any, grace: float, drain: Callable[[], None],
                 running: Callable[[], int], idle: Callable[[], defer.Deferred[None]]) -> None:
        self._reactor = reactor
        self._grace = grace
        self._drain = drain
        self._running = running
        self._idle = idle

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        running = self._running()
        if self._grace <= 0 or not running:
            return defer.succeed(None)
        self._drain()
        self.log.info("stopping: draining first, {running} running tasks have up to "
                      "{grace}s to finish", running=running, grace=self._grace)
        waiter: defer.Deferred[None] = defer.Deferred()
        # A fresh Deferred: the timeout cancels it, never the executor's own waiter.
        self._idle().addBoth(lambda _: None if waiter.called else waiter.callback(None))
        waiter.addTimeout(self._grace, self._reactor)

        def grace_over(failure: Any) -> None:
            failure.trap(defer.TimeoutError)
            self.log.warn("stop grace of {grace}s over: {running} tasks still running are "
                          "cancelled", grace=self._grace, running=self._running())
        return waiter.addErrback(grace_over)

"""The leader's care of a dead node's work: its unfinished tasks become ``lost`` and
those submitted with ``retries`` run again elsewhere as a new attempt (named by the lost
record's ``retried_by``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from oxide_cluster.clock import Clock
from oxide_cluster.interfaces import ClusterDirectory
from oxide_cluster.model import TERMINAL_STATES, rfc3339
from oxide_cluster.node import Elector

if TYPE_CHECKING:
    from oxide_cluster.membership import Membership

# Membership events after which a node's unfinished tasks are gone: it was declared dead,
# or it came back with a new start time (its old processes died with it).
NODE_GONE_EVENTS = ("dead", "restarted")
PRIVATE_FIELDS = ("env", "secret_env_keys")


class Retrier(Protocol):
    """``routing.TaskRouter``: places a lost task again as a new attempt."""

    async def place_retry(self, record: dict[str, Any]) -> dict[str, Any]: ...


class LeadingNode(Protocol):
    """``node.Node``: who this node is, whether it leads, whom it has seen die."""

    @property
    def node_id(self) -> str: ...

    @property
    def elector(self) -> Elector: ...

    @property
    def membership(self) -> Membership | None: ...


class Recovery:
    """Subscribed to membership; acts only while this node leads."""

    log = Logger()
    MAX_ATTEMPTS = 10

    def __init__(self, reactor: Clock, node: LeadingNode, directory: ClusterDirectory,
                 router: Retrier,
                 publish: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._reactor = reactor
        self._node = node
        self._directory = directory
        self._router = router
        self._publish = publish
        self.recovered = 0

    def membership_event(self, event: dict[str, Any]) -> None:
        if event.get("type") != "node" or event.get("event") not in NODE_GONE_EVENTS:
            return
        if not self._node.elector.is_leader:
            return
        self._recover_in_background(event["node"]["node_id"], event["event"])

    def _recover_in_background(self, node_id: str, why: str, attempt: int = 1) -> None:
        """Recover now; on a failure (Redis slow or away) try again while still leading."""
        recovering = defer.Deferred.fromCoroutine(self.recover_node(node_id, why))

        def failed(failure: Failure) -> None:
            self.log.warn("recovering the tasks of node {node_id} failed (attempt {n}): "
                          "{error}", node_id=node_id, n=attempt,
                          error=failure.getErrorMessage())
            if attempt < self.MAX_ATTEMPTS:
                self._reactor.callLater(min(attempt, 5), self._retry_recovery, node_id, why,
                                        attempt + 1)
        recovering.addErrback(failed)

    def _retry_recovery(self, node_id: str, why: str, attempt: int) -> None:
        if self._node.elector.is_leader:
            self._recover_in_background(node_id, why, attempt)

    def leader_changed(self, leader: dict[str, Any]) -> None:
        """A new leader takes over what its predecessor may not have finished: the work
        of peers it has itself seen die (never of peers it merely has not heard yet)."""
        if leader.get("node_id") != self._node.node_id or not self._node.elector.is_leader:
            return
        if self._node.membership is None:
            return
        for peer in self._node.membership.peers():
            if peer.state.value == "dead":
                self._recover_in_background(peer.node_id, "dead")

    async def recover_node(self, node_id: str, why: str = "dead") -> list[dict[str, Any]]:
        """Mark the node's unfinished tasks lost; retry those that may be retried."""
        lost = []
        for record in await self._directory.unfinished(node_id):
            if record.get("state") in {state.value for state in TERMINAL_STATES}:
                continue
            cause = "died" if why == "dead" else "restarted"
            record.update(state="lost", finished_at=rfc3339(self._reactor.seconds()),
                          reason=f"node {node_id} {cause} while the task was "
                                 f"{record.get('state', 'running')}")
            retry = int(record.get("retries") or 0) > 0
            if retry and record.get("secret_env_keys"):
                retry = False
                record["reason"] += "; not retried: secret_env values are never kept"
            await self._directory.record_lost(record)
            self.recovered += 1
            public = {k: v for k, v in record.items() if k not in PRIVATE_FIELDS}
            self.log.warn("task {task_id} lost: {reason}", task_id=record["id"],
                          reason=record["reason"])
            if self._publish is not None:
                self._publish({"type": "task", "event": "lost", "task": public})
            if retry:
                try:
                    attempt = await self._router.place_retry(record)
                except Exception as error:
                    self.log.warn("retry of task {task_id} failed: {error}",
                                  task_id=record["id"], error=error)
                else:
                    self.log.info("task {task_id} retried as {new_id} on {node}",
                                  task_id=record["id"], new_id=attempt.get("id"),
                                  node=attempt.get("node_id"))
                    # Whoever follows the lost task (``run --parallel``) finds its next
                    # attempt here, without scanning every node's tasks.
                    record["retried_by"] = public["retried_by"] = attempt.get("id")
                    await self._directory.record_retried(record)
            lost.append(public)
        return lost

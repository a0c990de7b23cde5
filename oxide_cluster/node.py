"""The local node as the API and discovery describe it: identity, load and peers."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import psutil
from twisted.internet import defer

from oxide_cluster import __version__
from oxide_cluster.clock import Clock
from oxide_cluster.config import Config
from oxide_cluster.drain import Drain
from oxide_cluster.model import Task, TaskRequest, rfc3339
from oxide_cluster.retention import Retention

if TYPE_CHECKING:
    from oxide_cluster.capacity import Capacity
    from oxide_cluster.cgroups import CgroupProvider
    from oxide_cluster.membership import Membership
    from oxide_cluster.stats import HostLoad


class NodeStore(Protocol):
    """What the API reads from the node's store (``store.Store``)."""

    is_open: bool

    def put_task(self, task: Task) -> defer.Deferred[None]: ...

    def list_tasks(self, state: str | None = None, node_id: str | None = None,
                   limit: int = 100, before: str | None = None
                   ) -> defer.Deferred[list[Task]]: ...

    def count_by_state(self) -> defer.Deferred[dict[str, int]]: ...

    def read_output(self, task_id: str, offset: int = 0, limit: int = ...
                    ) -> defer.Deferred[list[tuple[int, str, bytes]]]: ...


class NodeExecutor(Protocol):
    """What the API and the node's stats read from the executor (``executor.Executor``)."""

    ready: bool
    max_tasks: int
    finished_total: int
    cgroups: CgroupProvider
    state_listeners: list[Callable[[Task], None]]

    @property
    def running_count(self) -> int: ...

    @property
    def free_slots(self) -> int: ...

    def new_task(self, request: TaskRequest, *, task_id: str | None = None,
                 attempt: int = 1, retry_of: str | None = None) -> Task: ...

    def when_finished(self, task_id: str) -> defer.Deferred[Task] | None: ...

    def when_output_past(self, task_id: str, offset: int) -> defer.Deferred[None] | None: ...

    def capacity(self) -> Capacity | None: ...


class LoadSampler(Protocol):
    """``stats.StatsSampler``: the host's last sampled load."""

    current: HostLoad


class Elector(Protocol):
    """Leadership as the node reports it (``election``'s electors)."""

    @property
    def is_leader(self) -> bool: ...

    @property
    def token(self) -> int | None: ...

    @property
    def highest_token(self) -> int: ...

    def leader(self) -> dict[str, Any]: ...

    def observe_token(self, token: int) -> bool: ...

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None: ...



class DiscoveryStatus(Protocol):
    """``discovery.DiscoveryService`` as ``/ready``, ``/stats`` and ``/metrics`` report it:
    whether its socket is bound, and its datagram counters."""

    @property
    def bound(self) -> bool: ...

    @property
    def counters(self) -> Mapping[str, Mapping[str, int]]: ...


def primary_ipv4() -> str | None:
    """The first non-loopback IPv4 address of this host (no DNS, never blocks)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


@attrs.frozen
class Node:
    """Collaborators of one node, all given by ``tap.build_node`` at construction.

    Built before discovery, which announces :meth:`announcement`; the peers come from
    ``membership``, the table discovery keeps current (built before both).
    """

    config: Config
    node_id: str
    secret: str
    store: NodeStore
    executor: NodeExecutor
    sampler: LoadSampler
    elector: Elector
    reactor: Clock
    membership: Membership | None = None  # None: discovery is off
    retention: Retention | None = None
    drain: Drain = attrs.Factory(Drain)
    hostname: str = attrs.field(factory=socket.gethostname)
    started_at: float = 0.0
    services: tuple[str, ...] = ("executor", "api", "ws")
    api_port: int = 0
    ip_address: str | None = attrs.field(factory=lambda: primary_ipv4())

    def stats(self) -> dict[str, Any]:
        load = self.sampler.current
        stats: dict[str, Any] = {
            "cpu_percent": load.cpu_percent,
            "memory_percent": load.memory_percent,
            "load": list(load.load),
            "running_tasks": self.executor.running_count,
            "free_slots": self.executor.free_slots,
        }
        if self.drain.draining:  # a leader places nothing on a draining node
            stats["draining"] = True
        capacity = self.executor.capacity()
        if capacity is not None:  # room for declared resources (wire version 3)
            stats.update(capacity.to_stats())
        return stats

    def leader(self) -> dict[str, Any]:
        """The contract shape of ``/api/cluster/leader``: since as RFC 3339 or null."""
        current = dict(self.elector.leader())
        current["since"] = rfc3339(current.get("since"))
        return current

    def announcement(self) -> dict[str, Any]:
        """What discovery tells peers about this node (kept small: one datagram)."""
        return {
            "node_id": self.node_id,
            "hostname": self.hostname,
            "api_port": self.api_port,
            "services": list(self.services),
            "labels": self.config.labels,
            "version": __version__,
            "started_at": self.started_at,
            "stats": self.stats(),
            "leader": self.elector.leader() if self.elector.is_leader else None,
        }

    def local_node_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "hostname": self.hostname,
            "ip_address": self.ip_address,
            "api_port": self.api_port,
            "state": "alive",
            "healthy": True,
            "last_seen": rfc3339(self.reactor.seconds()),
            "labels": self.config.labels,
            "services": list(self.services),
            "stats": self.stats(),
        }

    def peers_json(self) -> list[dict[str, Any]]:
        if self.membership is None:
            return []
        from oxide_cluster.membership import node_json

        return [node_json(peer) for peer in self.membership.peers()]

    def cluster_nodes(self) -> dict[str, Any]:
        """The contract shape of ``/api/cluster/nodes``.

        The leader is stated once, as ``/api/cluster/leader`` gives it; each node only says
        whether it is that leader (``is_leader``), so the two can never disagree.
        """
        leader = self.leader()
        local = self.local_node_json()
        remote = self.peers_json()
        for node in (local, *remote):
            node["is_leader"] = leader["node_id"] is not None \
                and node["node_id"] == leader["node_id"]
        return {
            "total_nodes": 1 + len(remote),
            "healthy_nodes": 1 + sum(1 for peer in remote if peer["healthy"]),
            "leader": leader,
            "local_node": local,
            "remote_nodes": remote,
        }

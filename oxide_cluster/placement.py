"""Where a task runs: the leader's choice of the least-loaded healthy node.

The choice is made from the load every node announces over discovery (4 times a second
by default) plus this node's own sample. Between announcements the leader counts the
tasks it has just sent to a node, so a burst of submissions spreads out instead of all
landing on the node that looked idlest a moment ago.

A task that declares ``resources`` goes only where they fit the node's free declared room
(``capacity.py``; announced in wire version 3); a node that announced no capacity (an
older node) is taken to fit, and its own admission (429 ``no_free_resources``) decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from oxide_cluster.capacity import Capacity, declared, misfit
from oxide_cluster.cgroups import Resources

if TYPE_CHECKING:
    from oxide_cluster.clock import SecondsClock
    from oxide_cluster.config import Config
    from oxide_cluster.membership import Membership


@attrs.frozen
class Candidate:
    node_id: str
    free_slots: int
    cpu_percent: float
    memory_percent: float
    labels: Mapping[str, str]
    draining: bool = False
    capacity: Capacity | None = None

    def fits(self, resources: Resources | None) -> bool:
        """The declared ``resources`` fit this node's free room (unknown room: yes)."""
        return self.capacity is None or misfit(resources, self.capacity.free_cpus,
                                               self.capacity.free_memory) is None

    def minus(self, resources: Resources | None) -> Candidate:
        """This node after one more task with ``resources`` went to it."""
        capacity = self.capacity
        if capacity is not None:
            cpus, memory = declared(resources)
            capacity = attrs.evolve(capacity, free_cpus=capacity.free_cpus - cpus,
                                    free_memory=capacity.free_memory - memory)
        return attrs.evolve(self, free_slots=self.free_slots - 1, capacity=capacity)


def eligible(candidate: Candidate, labels: Mapping[str, str],
             resources: Resources | None = None) -> bool:
    """A node may take the task: it is not draining, has every label the task asks for,
    and room for the resources it declares."""
    return not candidate.draining and all(candidate.labels.get(key) == value
                                          for key, value in labels.items()) \
        and candidate.fits(resources)


def rank(candidates: Iterable[Candidate], labels: Mapping[str, str],
         resources: Resources | None = None) -> list[Candidate]:
    """Eligible nodes, best first: most free slots, then lowest CPU, then memory.

    A node that looks full stays in the list, last: its announced load may be a moment
    old, and its own admission check (429) is the final word. A node without room for
    the declared ``resources`` is left out.
    """
    return sorted((c for c in candidates if eligible(c, labels, resources)),
                  key=lambda c: (c.free_slots <= 0, -c.free_slots, c.cpu_percent,
                                 c.memory_percent, c.node_id))


class PlacingNode(Protocol):
    """``node.Node``: this node's id, labels and load, and the peers it has heard."""

    @property
    def node_id(self) -> str: ...

    @property
    def config(self) -> Config: ...

    @property
    def membership(self) -> Membership | None: ...

    def stats(self) -> dict[str, Any]: ...


class Placement:
    """The leader's view of capacity, with its own recent placements subtracted."""

    def __init__(self, reactor: SecondsClock, node: PlacingNode, hold: float = 1.0) -> None:
        self._reactor = reactor
        self._node = node
        self._hold = hold
        self._recent: dict[str, list[tuple[float, float, int]]] = {}

    def candidates(self) -> list[Candidate]:
        node = self._node
        stats = node.stats()
        found = [Candidate(node.node_id, stats["free_slots"], stats["cpu_percent"],
                           stats["memory_percent"], node.config.labels,
                           bool(stats.get("draining")), Capacity.from_stats(stats))]
        if node.membership is not None:
            for peer in node.membership.healthy():
                if not peer.api_port:
                    continue
                unseen, cpus, memory = self._placed_since(peer.node_id, peer.last_heard)
                capacity = Capacity.from_stats(peer.stats)
                if capacity is not None:
                    capacity = attrs.evolve(capacity, free_cpus=capacity.free_cpus - cpus,
                                            free_memory=capacity.free_memory - memory)
                found.append(Candidate(
                    peer.node_id, int(peer.stats.get("free_slots") or 0) - unseen,
                    float(peer.stats.get("cpu_percent") or 0.0),
                    float(peer.stats.get("memory_percent") or 0.0), peer.labels,
                    bool(peer.stats.get("draining")), capacity))
        return found

    def _placed_since(self, node_id: str, announced_at: float) -> tuple[int, float, int]:
        """Placements on a node that its last announcement cannot have counted yet: how
        many, and the CPUs and memory they declared."""
        now = self._reactor.seconds()
        recent = [entry for entry in self._recent.get(node_id, [])
                  if entry[0] >= announced_at and now - entry[0] < self._hold]
        self._recent[node_id] = recent
        return (len(recent), sum(entry[1] for entry in recent),
                sum(entry[2] for entry in recent))

    def choose(self, labels: Mapping[str, str], exclude: Iterable[str] = (),
               resources: Resources | None = None) -> list[str]:
        """Node ids to try, best first."""
        skipped = set(exclude)
        return [c.node_id for c in rank(self.candidates(), labels, resources)
                if c.node_id not in skipped]

    def placed(self, node_id: str, resources: Resources | None = None) -> None:
        """Count a task sent to a node that is still running as far as we know."""
        if node_id != self._node.node_id:  # our own count is exact already
            cpus, memory = declared(resources)
            self._recent.setdefault(node_id, []).append(
                (self._reactor.seconds(), cpus, memory))

"""Where a task runs: the leader's choice of the least-loaded healthy node.

The choice is made from the load every node announces over discovery (4 times a second
by default) plus this node's own sample. Between announcements the leader counts the
tasks it has just sent to a node, so a burst of submissions spreads out instead of all
landing on the node that looked idlest a moment ago.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs


@attrs.frozen
class Candidate:
    node_id: str
    free_slots: int
    cpu_percent: float
    memory_percent: float
    labels: Mapping[str, str]
    draining: bool = False


def eligible(candidate: Candidate, labels: Mapping[str, str]) -> bool:
    """A node may take the task: it is not draining and has every label the task asks for."""
    return not candidate.draining and all(candidate.labels.get(key) == value
                                          for key, value in labels.items())


def rank(candidates: Iterable[Candidate], labels: Mapping[str, str]) -> list[Candidate]:
    """Eligible nodes, best first: most free slots, then lowest CPU, then memory.

    A node that looks full stays in the list, last: its announced load may be a moment
    old, and its own admission check (429) is the final word.
    """
    return sorted((c for c in candidates if eligible(c, labels)),
                  key=lambda c: (c.free_slots <= 0, -c.free_slots, c.cpu_percent,
                                 c.memory_percent, c.node_id))


class Placement:
    """The leader's view of capacity, with its own recent placements subtracted."""

    def __init__(self, reactor: Any, node: Any, hold: float = 1.0) -> None:
        self._reactor = reactor
        self._node = node
        self._hold = hold
        self._recent: dict[str, list[float]] = {}

    def candidates(self) -> list[Candidate]:
        node = self._node
        stats = node.stats()
        found = [Candidate(node.node_id, stats["free_slots"], stats["cpu_percent"],
                           stats["memory_percent"], node.config.labels,
                           bool(stats.get("draining")))]
        if node.discovery is not None:
            for peer in node.discovery.membership.healthy():
                if not peer.api_port:
                    continue
                unseen = self._placed_since(peer.node_id, peer.last_heard)
                found.append(Candidate(
                    peer.node_id, int(peer.stats.get("free_slots") or 0) - unseen,
                    float(peer.stats.get("cpu_percent") or 0.0),
                    float(peer.stats.get("memory_percent") or 0.0), peer.labels,
                    bool(peer.stats.get("draining"))))
        return found

    def _placed_since(self, node_id: str, announced_at: float) -> int:
        """Placements on a node that its last announcement cannot have counted yet."""
        now = self._reactor.seconds()
        recent = [t for t in self._recent.get(node_id, [])
                  if t >= announced_at and now - t < self._hold]
        self._recent[node_id] = recent
        return len(recent)

    def choose(self, labels: Mapping[str, str], exclude: Iterable[str] = ()) -> list[str]:
        """Node ids to try, best first."""
        skipped = set(exclude)
        return [c.node_id for c in rank(self.candidates(), labels) if c.node_id not in skipped]

    def placed(self, node_id: str) -> None:
        """Count a task sent to a node that is still running as far as we know."""
        if node_id != self._node.node_id:  # our own count is exact already
            self._recent.setdefault(node_id, []).append(self._reactor.seconds())

"""Drain: a node that takes no new tasks and lets its running ones finish.

One small shared value: the scheduler refuses submissions and starts nothing from its
queue while it is set, the node's announcement carries it (so a leader places elsewhere),
and ``/ready`` answers 503 so that load balancers stop sending work.
"""

from __future__ import annotations

import attrs

RETRY_AFTER = 30  # seconds a client is told to wait: a drain usually ends in a restart


@attrs.define
class Drain:
    """Whether this node is draining, and since when (reactor seconds)."""

    draining: bool = False
    since: float | None = None

    def to_json(self) -> dict[str, object]:
        from oxide_cluster.model import rfc3339

        return {"draining": self.draining, "since": rfc3339(self.since)}

"""Who leads the cluster. Without Redis a node is standalone and leads itself."""

from __future__ import annotations

from typing import Any

from twisted.application import service


class StandaloneElector(service.Service):
    """The elector of a node without Redis: always the leader, with a fixed token 1."""

    is_leader = True
    token = 1

    def __init__(self, reactor: Any, node_id: str) -> None:
        self._reactor = reactor
        self.node_id = node_id
        self.since: float | None = None

    def startService(self) -> None:
        super().startService()
        self.since = self._reactor.seconds()

    def leader(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "token": self.token, "since": self.since}

"""Simulated peers: UDP announcers that speak oxide_cluster.wire like real nodes.

One thread drives every fake peer (one socket each on loopback): each announces to the
agent every ``interval`` seconds and answers a ``query`` at once, so the agent keeps them
``alive`` at the same datagram rate as real nodes. Used to measure an agent's idle cost
with 30 peers without running 30 agents on a 2-core machine.
"""

from __future__ import annotations

import secrets
import select
import socket
import threading
import time
from typing import Any

from oxide_cluster import __version__, wire


class Announcers(threading.Thread):
    """``count`` fake peers announcing to ``target`` (host, port) until ``stop``."""

    def __init__(self, count: int, secret: str, target: tuple[str, int],
                 interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.key = wire.derive_key(secret)
        self.target = target
        self.interval = interval
        self.stopped = threading.Event()
        self.sockets: list[socket.socket] = []
        self.ids: list[str] = []
        for index in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self.sockets.append(sock)
            self.ids.append(f"fake{index:02d}-{secrets.token_hex(4)}")
        self.started_at = time.time()
        self.sent = self.received = 0

    @property
    def ports(self) -> list[int]:
        return [sock.getsockname()[1] for sock in self.sockets]

    def body(self, node_id: str) -> dict[str, Any]:
        return {"node_id": node_id, "hostname": node_id, "api_port": 9,
                "services": ["executor", "api", "ws"], "labels": {}, "version": __version__,
                "started_at": self.started_at,
                "stats": {"cpu_percent": 1.0, "memory_percent": 10.0, "load": [0.1, 0.1, 0.1],
                          "running_tasks": 0, "free_slots": 2},
                "leader": None}

    def announce(self, index: int, to: tuple[str, int]) -> None:
        node_id = self.ids[index]
        data = wire.encode(self.key, wire.ANNOUNCE, node_id, self.body(node_id), ts=time.time())
        try:
            self.sockets[index].sendto(data, to)
            self.sent += 1
        except OSError:
            pass

    def run(self) -> None:
        by_fd = {sock.fileno(): i for i, sock in enumerate(self.sockets)}
        next_tick = time.monotonic()
        while not self.stopped.is_set():
            now = time.monotonic()
            if now >= next_tick:
                for index in range(len(self.sockets)):
                    self.announce(index, self.target)
                next_tick = now + self.interval
            readable, _, _ = select.select(self.sockets, [], [], max(0.0, next_tick - now))
            for sock in readable:
                try:
                    data, sender = sock.recvfrom(2048)
                except OSError:
                    continue
                self.received += 1
                if b'"type":"query"' in data:
                    self.announce(by_fd[sock.fileno()], sender)

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)
        for sock in self.sockets:
            sock.close()

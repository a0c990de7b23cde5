"""The ``codara`` discovery transport: UDP broadcast, plus the Codara agent's datagrams.

A Codara main server finds its cluster agents by two JSON datagrams each agent sends on
its discovery port (the Codara cluster agent's README, "Discovery Protocol"):
``cluster_announce`` every 5 s and ``cluster_stats`` every 10 s. With this transport an
oxide node sends them too, so such a server lists oxide nodes. They are unauthenticated:
anyone on the segment can read or forge them. Oxide's own membership stays on the signed
protocol (``wire``) over the same socket, and a Codara datagram that arrives is dropped
unread: nothing a Codara datagram says is ever trusted.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable, Mapping
from typing import Any

import psutil
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from oxide_cluster.discovery import UdpTransport
from oxide_cluster.interfaces import Address, IDiscoveryTransport

log = Logger()

ANNOUNCE = "cluster_announce"
STATS = "cluster_stats"
ANNOUNCE_EVERY = 5.0
STATS_EVERY = 10.0
#: How a Codara agent's datagram begins (JSON.stringify puts ``type`` first, no spaces);
#: our own datagrams are canonical JSON, whose first key is ``body``.
CODARA_PREFIX = b'{"type":"cluster_'

# Node.js os.arch() names, which the Codara agent reports.
_ARCH = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64",
         "i386": "ia32", "i686": "ia32", "armv7l": "arm", "armv6l": "arm",
         "ppc64le": "ppc64", "s390x": "s390x"}


def node_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH.get(machine, machine)


def _ms(seconds: float) -> int:
    """Codara's ``timestamp``: JavaScript's Date.now(), integer milliseconds."""
    return int(seconds * 1000)


def announce_message(node: Mapping[str, Any], now: float) -> dict[str, Any]:
    """``cluster_announce`` for an oxide node's announcement body (``Node.announcement``)."""
    return {
        "type": ANNOUNCE,
        "hostname": str(node["hostname"]),
        "platform": sys.platform,
        "arch": node_arch(),
        "cpus": os.cpu_count() or 1,
        "totalMemory": int(psutil.virtual_memory().total),
        "port": int(node["api_port"]),
        "timestamp": _ms(now),
    }


def stats_message(node: Mapping[str, Any], now: float) -> dict[str, Any]:
    """``cluster_stats``: Codara's ``cpu`` is the 1-minute load average, as its agent sends."""
    stats = node["stats"]
    load = stats.get("load") or [0.0]
    return {
        "type": STATS,
        "hostname": str(node["hostname"]),
        "port": int(node["api_port"]),
        "stats": {
            "cpu": float(load[0]),
            "memoryUsagePercent": float(stats["memory_percent"]),
            "runningTasks": int(stats["running_tasks"]),
            "availableSlots": int(stats["free_slots"]),
        },
        "timestamp": _ms(now),
    }


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


@implementer(IDiscoveryTransport)
class CodaraTransport:
    """The ``broadcast`` transport, also emitting Codara's datagrams to the cluster (and
    to ``server``, a Codara main server reached by unicast) while it is bound."""

    def __init__(self, reactor: Any, udp: UdpTransport,
                 local_node: Callable[[], Mapping[str, Any]], server: Address | None = None,
                 *, wall: Callable[[], float] | None = None,
                 announce_every: float = ANNOUNCE_EVERY,
                 stats_every: float = STATS_EVERY) -> None:
        self.reactor = reactor
        self.udp = udp
        self.local_node = local_node
        self.server = server
        self.wall: Callable[[], float] = reactor.seconds if wall is None else wall
        self.ignored = 0  # Codara datagrams received and dropped unread
        self._loops = [(announce_every, self._emitter(announce_message)),
                       (stats_every, self._emitter(stats_message))]
        self._running: list[LoopingCall] = []
        self._first: list[Any] = []  # IDelayedCall

    def _emitter(self, build: Callable[[Mapping[str, Any], float], dict[str, Any]]
                 ) -> Callable[[], None]:
        def emit() -> None:
            # LoopingCall stops for good when its callable raises: log instead.
            try:
                self._send_all(encode(build(self.local_node(), self.wall())))
            except Exception:
                log.failure("building a Codara datagram failed")
        return emit

    def _send_all(self, datagram: bytes) -> None:
        targets = self.udp.cluster_addresses()
        if self.server is not None:
            targets.append(self.server)
        for address in targets:
            try:
                self.udp.send(datagram, address)
            except OSError as error:
                log.warn("sending a Codara datagram to {address} failed: {error}",
                         address=address, error=error)

    def bind(self, deliver: Callable[[bytes, Address], None]) -> int:
        def deliver_ours(datagram: bytes, sender: Address) -> None:
            if datagram.startswith(CODARA_PREFIX):
                self.ignored += 1
                return
            deliver(datagram, sender)

        port = self.udp.bind(deliver_ours)
        self.udp.refresh()  # the first Codara announce must find the broadcast addresses
        for number, (interval, emit) in enumerate(self._loops):
            loop = LoopingCall(emit)
            loop.clock = self.reactor
            loop.start(interval, now=False).addErrback(
                lambda f: log.failure("the Codara emitter stopped", f))
            self._running.append(loop)
            # Like the Codara agent, announce at once (its first stats follow it).
            self._first.append(self.reactor.callLater(0.1 * (number + 1), emit))
        return port

    def refresh(self) -> None:
        self.udp.refresh()

    def cluster_addresses(self) -> list[Address]:
        return self.udp.cluster_addresses()

    def reaches(self, address: Address) -> bool:
        return self.udp.reaches(address)

    def send(self, datagram: bytes, address: Address) -> None:
        self.udp.send(datagram, address)

    def close(self) -> defer.Deferred[None]:
        for call in self._first:
            if call.active():
                call.cancel()
        for loop in self._running:
            if loop.running:
                loop.stop()
        self._first, self._running = [], []
        return self.udp.close()


__all__ = ["ANNOUNCE", "ANNOUNCE_EVERY", "STATS", "STATS_EVERY", "CodaraTransport",
           "announce_message", "encode", "stats_message"]

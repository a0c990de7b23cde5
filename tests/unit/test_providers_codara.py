"""The ``codara`` transport on a task.Clock: Codara's datagrams, their cadence, and that
what arrives from a Codara agent never reaches membership."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from oxide_cluster import config, providers
from oxide_cluster.codara import CodaraTransport
from oxide_cluster.discovery import UdpTransport
from oxide_cluster.interfaces import IDiscoveryTransport

SERVER = ("192.0.2.7", 4001)
BROADCAST = ("10.0.0.255", 4001)


class FakeUdpPort:
    def __init__(self, port: int, protocol: Any) -> None:
        self.port, self.protocol = port, protocol
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.open = True

    def setBroadcastAllowed(self, allowed: bool) -> None:
        pass

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "0.0.0.0", self.port)

    def write(self, data: bytes, address: tuple[str, int]) -> None:
        self.written.append((data, address))

    def stopListening(self) -> defer.Deferred[None]:
        self.open = False
        return defer.succeed(None)


class UdpReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakeUdpPort] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "",
                  maxPacketSize: int = 8192) -> FakeUdpPort:
        self.ports.append(FakeUdpPort(port, protocol))
        return self.ports[-1]


def node() -> dict[str, Any]:
    return {"node_id": "n1", "hostname": "oxide-7", "api_port": 4000,
            "stats": {"cpu_percent": 12.5, "memory_percent": 40.0, "load": [0.75, 0.5, 0.25],
                      "running_tasks": 1, "free_slots": 3}}


def codara(reactor: UdpReactor) -> CodaraTransport:
    loaded = config.load({"discovery_transport": "codara", "discovery_interface": "10.0.0.255",
                          "provider_options": "codara_server=192.0.2.7"}, {})
    return providers.select(loaded, providers.BUILTIN).build(
        "discovery_transport", reactor, loaded, "n1", local_node=node)


def sent(reactor: UdpReactor, kind: str) -> list[tuple[dict[str, Any], tuple[str, int]]]:
    messages = [(json.loads(data), address) for data, address in reactor.ports[0].written
                if data.startswith(b'{"type":')]
    return [(m, address) for m, address in messages if m["type"] == kind]


def test_codara_is_opt_in_and_built_as_a_transport():
    assert providers.chosen_names(config.load({}, {}))["discovery_transport"] == "broadcast"
    transport = codara(UdpReactor())
    assert isinstance(transport, CodaraTransport) and verifyObject(IDiscoveryTransport,
                                                                   transport)
    assert transport.server == SERVER


def test_announce_every_5s_and_stats_every_10s_to_the_cluster_and_the_server():
    reactor = UdpReactor()
    transport = codara(reactor)
    assert transport.bind(lambda data, sender: None) == 4001
    reactor.pump([0.1] * 203)  # t = 20.3: announces at 0.1, 5, 10, 15, 20; stats at 0.2, 10, 20
    announces, stats = sent(reactor, "cluster_announce"), sent(reactor, "cluster_stats")
    assert [a for _, a in announces] == [BROADCAST, SERVER] * 5
    assert [a for _, a in stats] == [BROADCAST, SERVER] * 3
    announce, _ = announces[-1]
    assert announce == {"type": "cluster_announce", "hostname": "oxide-7",
                        "platform": announce["platform"], "arch": announce["arch"],
                        "cpus": announce["cpus"], "totalMemory": announce["totalMemory"],
                        "port": 4000, "timestamp": announce["timestamp"]}
    assert isinstance(announce["timestamp"], int) and 20000 <= announce["timestamp"] <= 20300
    assert isinstance(announce["cpus"], int) and isinstance(announce["totalMemory"], int)
    assert stats[-1][0] == {"type": "cluster_stats", "hostname": "oxide-7", "port": 4000,
                            "stats": {"cpu": 0.75, "memoryUsagePercent": 40.0,
                                      "runningTasks": 1, "availableSlots": 3},
                            "timestamp": stats[-1][0]["timestamp"]}
    assert isinstance(stats[-1][0]["timestamp"], int)
    # The node's own (signed) discovery traffic still goes through the same socket.
    transport.send(b'{"body":{}}', ("10.0.0.9", 4001))
    assert reactor.ports[0].written[-1] == (b'{"body":{}}', ("10.0.0.9", 4001))


def test_codara_datagrams_that_arrive_are_dropped_unread_and_ours_delivered():
    reactor = UdpReactor()
    transport = codara(reactor)
    delivered: list[bytes] = []
    transport.bind(lambda data, sender: delivered.append(data))
    protocol = reactor.ports[0].protocol
    protocol.datagramReceived(b'{"type":"cluster_announce","hostname":"evil"}',
                              ("10.0.0.3", 4001))
    protocol.datagramReceived(b'{"body":{},"mac":"x"}', ("10.0.0.3", 4001))
    assert delivered == [b'{"body":{},"mac":"x"}'] and transport.ignored == 1


def test_close_stops_the_codara_datagrams():
    reactor = UdpReactor()
    transport = codara(reactor)
    transport.bind(lambda data, sender: None)
    reactor.advance(0.05)
    closed = transport.close()
    assert closed.called and not reactor.ports[0].open
    reactor.pump([5.0] * 6)
    assert reactor.ports[0].written == [] and reactor.getDelayedCalls() == []


def test_a_failing_announcement_is_logged_and_the_next_one_still_goes():
    reactor = UdpReactor()
    calls = iter([RuntimeError("sampler not ready"), node(), node()])

    def flaky() -> dict[str, Any]:
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    transport = CodaraTransport(reactor, UdpTransport(reactor, 4001,
                                                      interfaces=("10.0.0.255",)), flaky)
    transport.bind(lambda data, sender: None)
    reactor.pump([0.1, 0.1, 5.0])
    assert len(sent(reactor, "cluster_announce")) == 1
    assert len(sent(reactor, "cluster_stats")) == 1
    transport.close()

"""DiscoveryService on a task.Clock with a fake datagram network, plus one real-socket test."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock

from oxide_cluster import wire
from oxide_cluster.discovery import DiscoveryService, DiscoverySettings, parse_peer
from oxide_cluster.membership import MemoryPeerStore, PeerState

SECRET = "cluster-secret"
BROADCAST = "10.0.0.255"


def node_body(node_id: str, started_at: float = 1.0) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "hostname": f"host-{node_id}",
        "api_port": 8080,
        "services": ["executor", "api"],
        "labels": {},
        "version": "0.1.0",
        "started_at": started_at,
        "stats": {
            "cpu_percent": 5.0,
            "memory_percent": 30.0,
            "load": [0.1, 0.1, 0.1],
            "running_tasks": 0,
            "free_slots": 2,
        },
        "leader": None,
    }


class FakePort:
    """The UDP port a fake reactor hands out: records and routes writes."""

    def __init__(self, net: FakeNetwork, ip: str, port: int, protocol: Any) -> None:
        self.net, self.ip, self.port, self.protocol = net, ip, port, protocol
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.broadcast_allowed = False
        self.open = True

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.open and len(data) <= wire.MAX_DATAGRAM
        self.written.append((data, addr))
        self.net.route(data, (self.ip, self.port), addr)

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self.broadcast_allowed = enabled

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.ip, self.port)

    def stopListening(self) -> defer.Deferred[None]:
        self.open = False
        self.net.ports.pop((self.ip, self.port), None)
        self.protocol.doStop()
        return defer.succeed(None)


class FakeNetwork:
    """A LAN segment on one Clock: 1 ms latency, optional random loss per receiver."""

    def __init__(self, clock: Clock, loss: float = 0.0, seed: int = 1) -> None:
        self.clock, self.loss, self.rng = clock, loss, random.Random(seed)
        self.ports: dict[tuple[str, int], FakePort] = {}

    def reactor(self, ip: str) -> FakeReactor:
        return FakeReactor(self, ip)

    def route(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        if dst[0] == BROADCAST:
            receivers = [p for (_, port), p in self.ports.items() if port == dst[1]]
        else:
            receivers = [self.ports[dst]] if dst in self.ports else []
        for port in receivers:
            if self.rng.random() >= self.loss:
                self.clock.callLater(0.001, self._deliver, port, data, src)

    @staticmethod
    def _deliver(port: FakePort, data: bytes, src: tuple[str, int]) -> None:
        if port.open:
            port.protocol.datagramReceived(data, src)


class FakeReactor:
    """IReactorTime from the shared Clock plus a listenUDP on the fake network."""

    def __init__(self, net: FakeNetwork, ip: str) -> None:
        self.net, self.ip = net, ip
        self.seconds = net.clock.seconds
        self.callLater = net.clock.callLater

    def listenUDP(self, port: int, protocol: Any, interface: str = "", **kw: Any) -> FakePort:
        fake = FakePort(self.net, self.ip, port or 40000 + len(self.net.ports), protocol)
        self.net.ports[(self.ip, fake.port)] = fake
        protocol.makeConnection(fake)
        return fake


def make_service(
    net: FakeNetwork,
    ip: str,
    node_id: str,
    *,
    secret: str = SECRET,
    store: MemoryPeerStore | None = None,
    **overrides: Any,
) -> DiscoveryService:
    options: dict[str, Any] = {"interfaces": (BROADCAST,), **overrides}
    return DiscoveryService(
        net.reactor(ip),
        DiscoverySettings(**options),
        lambda: node_body(node_id),
        store if store is not None else MemoryPeerStore(),
        secret,
    )


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_700_000_000.0)  # ts is wall time; keep it realistic
    return clock


def run(clock: Clock, seconds: float, step: float = 0.001) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


def sent_types(port: FakePort) -> list[str]:
    return [json.loads(data)["type"] for data, _ in port.written]


def test_start_binds_queries_then_bursts_announces(clock: Clock) -> None:
    net = FakeNetwork(clock)
    svc = make_service(net, "10.0.0.1", "a")
    svc.startService()
    port = net.ports[("10.0.0.1", 4001)]
    assert svc.bound and svc.port == 4001 and port.broadcast_allowed
    run(clock, 0.11)
    assert sent_types(port) == ["query", "announce", "announce", "announce"]
    assert {addr for _, addr in port.written} == {(BROADCAST, 4001)}
    run(clock, 0.2)
    assert sent_types(port)[-1] == "announce" and svc.counters["sent"]["announce"] == 4


def test_two_nodes_learn_each_other_and_own_datagrams_are_ignored(clock: Clock) -> None:
    net = FakeNetwork(clock)
    a, b = make_service(net, "10.0.0.1", "a"), make_service(net, "10.0.0.2", "b")
    a.startService()
    b.startService()
    run(clock, 0.01)
    assert [p.node_id for p in a.membership.healthy()] == ["b"]
    assert [p.node_id for p in b.membership.healthy()] == ["a"]
    peer = a.membership.get("b")
    assert peer is not None and (peer.ip_address, peer.discovery_port) == ("10.0.0.2", 4001)
    assert a.counters["ignored"]["own"] > 0 and a.membership.get("a") is None


def test_query_is_answered_at_once_by_unicast_announce(clock: Clock) -> None:
    net = FakeNetwork(clock)
    a = make_service(net, "10.0.0.1", "a")
    a.startService()
    run(clock, 0.2)
    port = net.ports[("10.0.0.1", 4001)]
    before = len(port.written)
    codec = wire.Codec.from_secret(SECRET, clock)
    port.protocol.datagramReceived(codec.encode(wire.QUERY, "z", {}), ("10.0.0.9", 5555))
    assert port.written[before:] and port.written[before][1] == ("10.0.0.9", 5555)
    assert json.loads(port.written[before][0])["type"] == "announce"
    assert a.counters["received"]["query"] == 1


def test_leave_on_stop_removes_the_peer_at_once(clock: Clock) -> None:
    net = FakeNetwork(clock)
    a, b = make_service(net, "10.0.0.1", "a"), make_service(net, "10.0.0.2", "b")
    a.startService()
    b.startService()
    run(clock, 0.1)
    events: list[str] = []
    a.membership.subscribe(lambda e: events.append(e["event"]))
    stopped = b.stopService()
    assert stopped.called and not b.bound
    run(clock, 0.01)
    assert events == ["left"] and a.membership.healthy() == []


def test_crashed_peer_is_suspect_then_dead_within_three_seconds(clock: Clock) -> None:
    net = FakeNetwork(clock)
    a, b = make_service(net, "10.0.0.1", "a"), make_service(net, "10.0.0.2", "b")
    a.startService()
    b.startService()
    run(clock, 0.5)
    events: list[tuple[str, float]] = []
    a.membership.subscribe(lambda e: events.append((e["event"], clock.seconds())))
    net.ports[("10.0.0.2", 4001)].open = False  # crash: silence, no leave
    crashed = clock.seconds()
    run(clock, 3.0)
    assert [e for e, _ in events] == ["suspect", "dead"]
    assert events[-1][1] - crashed <= 3.0
    # Probes went to the suspect peer by unicast.
    port_a = net.ports[("10.0.0.1", 4001)]
    assert any(addr == ("10.0.0.2", 4001) for _, addr in port_a.written)


def test_ten_nodes_with_20_percent_loss_never_declare_a_live_node_dead(clock: Clock) -> None:
    net = FakeNetwork(clock, loss=0.2, seed=7)
    nodes = [make_service(net, f"10.0.0.{i}", f"n{i}") for i in range(1, 11)]
    dead: list[tuple[str, str]] = []
    for svc in nodes:
        svc.startService()
    run(clock, 1.0, step=0.005)
    for svc in nodes:
        svc.membership.subscribe(
            lambda e, me=svc.node_id: dead.append((me, e["node"]["node_id"]))
            if e["event"] == "dead" else None
        )
    run(clock, 60.0, step=0.005)
    assert dead == []
    assert all(len(svc.membership.healthy()) == 9 for svc in nodes)


def test_forged_and_replayed_datagrams_are_dropped_and_counted(clock: Clock) -> None:
    net = FakeNetwork(clock)
    a = make_service(net, "10.0.0.1", "a")
    a.startService()
    proto = net.ports[("10.0.0.1", 4001)].protocol
    forged = wire.Codec.from_secret("wrong", clock).encode(wire.ANNOUNCE, "x", node_body("x"))
    proto.datagramReceived(forged, ("10.0.0.66", 4001))
    good = wire.Codec.from_secret(SECRET, clock).encode(wire.ANNOUNCE, "x", node_body("x"))
    proto.datagramReceived(good, ("10.0.0.7", 4001))
    proto.datagramReceived(good, ("10.0.0.7", 4001))
    stale = wire.encode(a.codec.key, wire.QUERY, "x", {}, ts=clock.seconds() - 60)
    future = wire.encode(a.codec.key, wire.QUERY, "x", {}, ts=clock.seconds() + 60)
    proto.datagramReceived(stale, ("10.0.0.7", 4001))
    proto.datagramReceived(future, ("10.0.0.7", 4001))
    proto.datagramReceived(b"x" * 2000, ("10.0.0.7", 4001))
    dropped = a.counters["dropped"]
    assert (dropped["bad_mac"], dropped["replayed"], dropped["stale"]) == (1, 1, 1)
    assert (dropped["future"], dropped["oversized"]) == (1, 1)
    assert [p.node_id for p in a.membership.peers()] == ["x"]


def test_stale_peers_are_loaded_from_the_store_and_probed(clock: Clock) -> None:
    net = FakeNetwork(clock)
    store = MemoryPeerStore([{"node_id": "old", "ip_address": "10.0.0.5", "discovery_port": 4001}])
    a = make_service(net, "10.0.0.1", "a", store=store)
    a.startService()
    peer = a.membership.get("old")
    assert peer is not None and peer.state is PeerState.STALE
    port = net.ports[("10.0.0.1", 4001)]
    assert any(addr == ("10.0.0.5", 4001) for _, addr in port.written)
    b = make_service(net, "10.0.0.2", "b")
    b.startService()
    run(clock, 6.0)
    assert store.saves >= 1 and {p["node_id"] for p in store.peers} == {"old", "b"}
    a.stopService()
    assert any(p["state"] == "alive" for p in store.peers)


def test_static_dns_peers_are_resolved_without_blocking(clock: Clock) -> None:
    net = FakeNetwork(clock)
    lookups: list[defer.Deferred[list[str]]] = []

    def resolver(host: str) -> defer.Deferred[list[str]]:
        assert host == "tasks.oxide"
        lookups.append(defer.Deferred())
        return lookups[-1]

    a = DiscoveryService(
        net.reactor("10.0.0.1"),
        DiscoverySettings(broadcast=False, peers=("tasks.oxide", "10.0.0.3:4002")),
        lambda: node_body("a"), MemoryPeerStore(), SECRET, resolver=resolver,
    )
    b = make_service(net, "10.0.0.2", "b", broadcast=False)
    a.startService()
    b.startService()
    assert len(lookups) == 1 and a.targets() == [("10.0.0.3", 4002)]
    lookups[0].callback(["10.0.0.2"])
    run(clock, 0.01)
    assert a.membership.get("b") is not None and b.membership.get("a") is not None
    run(clock, 30.0)
    assert len(lookups) == 2  # re-resolved every resolve_interval
    lookups[1].errback(OSError("dns down"))
    assert ("10.0.0.2", 4001) in a.targets()  # a failure keeps the last answer


def test_timer_survives_a_failing_local_node(clock: Clock) -> None:
    net = FakeNetwork(clock)
    calls = []

    def flaky() -> dict[str, Any]:
        calls.append(1)
        if len(calls) in (2, 3):
            raise RuntimeError("stats unavailable")
        return node_body("a")

    a = DiscoveryService(net.reactor("10.0.0.1"), DiscoverySettings(interfaces=(BROADCAST,)),
                         flaky, MemoryPeerStore(), SECRET)
    a.startService()
    run(clock, 1.0)
    assert a.counters["sent"]["announce"] >= 3


def test_oversized_local_node_is_refused_and_counted(clock: Clock) -> None:
    net = FakeNetwork(clock)
    big = {**node_body("a"), "labels": {f"l{i}": "v" * 120 for i in range(30)}}
    a = DiscoveryService(net.reactor("10.0.0.1"), DiscoverySettings(interfaces=(BROADCAST,)),
                         lambda: big, MemoryPeerStore(), SECRET)
    a.startService()
    assert a.counters["errors"]["encode"] >= 1 and a.counters["sent"]["announce"] == 0


def test_disabled_discovery_binds_nothing(clock: Clock) -> None:
    net = FakeNetwork(clock)
    a = make_service(net, "10.0.0.1", "a", enabled=False)
    a.startService()
    assert not a.bound and net.ports == {}
    assert a.stopService().called


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"suspect_after": 3.0, "dead_after": 2.0}, "suspect_after"),
        ({"peers": ("host:notaport",)}, "host"),
        ({"announce_interval": 0}, "positive"),
        ({"port": 70000}, "port"),
    ],
)
def test_settings_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiscoverySettings(**kwargs)


def test_parse_peer_defaults_the_port() -> None:
    assert parse_peer("tasks.oxide", 4001) == ("tasks.oxide", 4001)
    assert parse_peer("10.0.0.2:5000", 4001) == ("10.0.0.2", 5000)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=1300), st.tuples(st.integers(0, 600), st.integers(0, 255))))
def test_garbage_never_raises_and_never_changes_membership(junk: Any) -> None:
    clock = Clock()
    clock.advance(1_700_000_000.0)
    net = FakeNetwork(clock)
    a = make_service(net, "10.0.0.1", "a", broadcast=False)
    a.startService()
    if isinstance(junk, tuple):  # mutate one byte of a valid datagram from a stranger
        valid = wire.Codec.from_secret(SECRET, clock).encode(
            wire.ANNOUNCE, "x", node_body("x"))
        pos, value = junk
        data = bytearray(valid)
        pos = pos % len(data)
        if data[pos] == value:
            return
        data[pos] = value
        junk = bytes(data)
    proto: Callable[[bytes, Any], None] = net.ports[("10.0.0.1", 4001)].protocol.datagramReceived
    proto(junk, ("10.0.0.66", 4001))
    assert a.membership.peers() == []
    a.stopService()


# -- one real-socket test -------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_real_sockets_two_nodes_find_each_other_and_a_wrong_secret_is_ignored() -> Any:
    from twisted.internet import reactor

    def real(node_id: str, port: int, peers: tuple[str, ...], secret: str) -> DiscoveryService:
        return DiscoveryService(
            reactor,
            DiscoverySettings(port=port, bind="127.0.0.1", broadcast=False, peers=peers),
            lambda: node_body(node_id), MemoryPeerStore(), secret,
        )

    # Ephemeral ports first, so the static peer lists can name them.
    probe = [reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1") for _ in range(3)]
    ports = [p.getHost().port for p in probe]
    yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in probe])
    targets = tuple(f"127.0.0.1:{p}" for p in ports)
    a = real("a", ports[0], targets, SECRET)
    b = real("b", ports[1], targets, SECRET)
    intruder = real("intruder", ports[2], targets, "not-the-secret")
    services = [a, b, intruder]
    for svc in services:
        svc.startService()
    try:
        deadline = reactor.seconds() + 5.0
        while not (a.membership.get("b") and b.membership.get("a")
                   and a.counters["dropped"]["bad_mac"] > 0):
            assert reactor.seconds() < deadline, (a.counters, b.counters)
            yield deferLater(reactor, 0.02)
        assert a.membership.get("b").healthy  # type: ignore[union-attr]
        assert a.membership.get("intruder") is None and b.membership.get("intruder") is None
        assert intruder.membership.peers() == []
    finally:
        yield defer.gatherResults([svc.stopService() for svc in services])
    assert not any(svc.bound for svc in services)


def deferLater(reactor: Any, delay: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, delay, lambda: None)



def test_drops_are_logged_rate_limited(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.logger import Logger

    from oxide_cluster import discovery

    events: list[dict[str, Any]] = []
    monkeypatch.setattr(discovery, "log", Logger(observer=events.append))
    net = FakeNetwork(clock)
    a = make_service(net, "10.0.0.1", "a", broadcast=False)
    a.startService()
    proto = net.ports[("10.0.0.1", 4001)].protocol
    for _ in range(50):
        proto.datagramReceived(b"junk", ("10.0.0.66", 4001))
    clock.advance(10.0)
    proto.datagramReceived(b"junk", ("10.0.0.66", 4001))
    drops = [e for e in events if e.get("reason") == "not_json"]
    assert a.counters["dropped"]["not_json"] == 51
    assert [e["suppressed"] for e in drops] == [0, 49]


def test_late_store_answer_after_stop_sends_nothing(clock: Clock) -> None:
    net = FakeNetwork(clock)
    pending: defer.Deferred[list[dict[str, Any]]] = defer.Deferred()

    class SlowStore(MemoryPeerStore):
        def load_peers(self) -> defer.Deferred[list[dict[str, Any]]]:
            return pending

    a = make_service(net, "10.0.0.1", "a", store=SlowStore())
    a.startService()
    port = net.ports[("10.0.0.1", 4001)]
    a.stopService()
    pending.callback([{"node_id": "old", "ip_address": "10.0.0.5", "discovery_port": 4001}])
    assert a.counters["errors"]["send"] == 0
    assert not any(addr == ("10.0.0.5", 4001) for _, addr in port.written)


# -- gossip -----------------------------------------------------------------------------


def test_a_chain_of_static_peers_converges_to_full_membership(clock: Clock) -> None:
    net = FakeNetwork(clock)
    hub = "10.0.0.1:4001"
    a = make_service(net, "10.0.0.1", "a", broadcast=False)
    b = make_service(net, "10.0.0.2", "b", broadcast=False, peers=(hub,))
    c = make_service(net, "10.0.0.3", "c", broadcast=False, peers=("10.0.0.2:4001",))
    for service in (a, b, c):
        service.startService()
    run(clock, 1.0)  # four announce intervals
    for service, others in ((a, ["b", "c"]), (b, ["a", "c"]), (c, ["a", "b"])):
        assert sorted(p.node_id for p in service.membership.healthy()) == others
        assert service.membership.rumours() == []
    assert a.counters["gossip"]["learned"] == 1 and c.counters["gossip"]["learned"] == 1
    # Stays converged: nobody flaps to suspect for lack of datagrams.
    events: list[str] = []
    for service in (a, b, c):
        service.membership.subscribe(lambda e: events.append(e["event"]))
    run(clock, 5.0, step=0.01)
    assert events == []


def test_a_crashed_node_is_not_kept_alive_by_gossip(clock: Clock) -> None:
    net = FakeNetwork(clock)
    a = make_service(net, "10.0.0.1", "a", broadcast=False)
    b = make_service(net, "10.0.0.2", "b", broadcast=False, peers=("10.0.0.1:4001",))
    c = make_service(net, "10.0.0.3", "c", broadcast=False, peers=("10.0.0.1:4001",))
    for service in (a, b, c):
        service.startService()
    run(clock, 1.0)
    assert b.membership.get("c") is not None
    crashed = net.ports.pop(("10.0.0.3", 4001))  # no leave: a crash
    crashed.open = False
    run(clock, 3.0, step=0.01)
    for service in (a, b):
        peer = service.membership.get("c")
        assert peer is not None and peer.state is PeerState.DEAD
    run(clock, b.membership.rumour_ttl, step=0.05)
    assert b.membership.rumours() == []
    assert ("10.0.0.3", 4001) not in b.unicast_targets()


def test_gossip_is_bounded_per_datagram_and_rotates_through_every_peer(clock: Clock) -> None:
    net = FakeNetwork(clock)
    a = make_service(net, "10.0.0.1", "a", broadcast=False)
    a.startService()
    run(clock, 0.01)
    ids = {f"{i:03d}-" + "x" * 100 for i in range(30)}
    for i, node_id in enumerate(sorted(ids)):
        a.membership.announce_received(node_id, node_body(node_id), (f"10.0.1.{i}", 4001))
    port = net.ports[("10.0.0.1", 4001)]
    before = len(port.written)
    for _ in range(15):
        a._announce_to([("10.0.0.99", 4001)])
    seen: set[str] = set()
    for data, _ in port.written[before:]:
        assert len(data) <= wire.MAX_DATAGRAM  # FakePort checks it too
        members = json.loads(data)["body"]["members"]
        assert 0 < len(members) <= wire.MAX_MEMBERS
        seen.update(m["node_id"] for m in members)
    assert seen == ids
    assert a.counters["errors"]["encode"] == 0


def test_bad_gossip_entries_are_dropped_and_counted(clock: Clock) -> None:
    net = FakeNetwork(clock)
    a = make_service(net, "10.0.0.1", "a", broadcast=False)
    a.startService()
    run(clock, 0.01)
    port = net.ports[("10.0.0.1", 4001)]
    good = {"node_id": "c", "ip": "10.0.0.3", "api_port": 4010, "discovery_port": 4011}
    members = [good, {**good, "node_id": "d", "api_port": "x"},
               {**good, "node_id": "e", "ip": "127.0.0.1"}, {"junk": True}]
    codec = wire.Codec.from_secret(SECRET, clock)
    data = codec.encode(wire.ANNOUNCE, "z", {**node_body("z"), "members": [good]})
    obj = json.loads(data)
    obj["body"]["members"] = members
    obj.pop("mac")
    obj["mac"] = wire._mac(codec.key, obj)
    before = len(port.written)
    port.protocol.datagramReceived(wire.canonical(obj), ("10.0.0.9", 4001))
    assert a.counters["gossip"] == {"learned": 1, "dropped": 3}
    assert a.counters["errors"]["handler"] == 0
    peer = a.membership.get("z")
    assert peer is not None and peer.healthy and a.membership.get("c") is None
    assert a.membership.rumour("c") is not None
    sent = [(json.loads(d)["type"], addr) for d, addr in port.written[before:]]
    assert ("query", ("10.0.0.3", 4011)) in sent and ("announce", ("10.0.0.3", 4011)) in sent
    assert ("10.0.0.9", 4001) in a.unicast_targets()  # it reached us by unicast: answer so

"""Providers by name, their interfaces, and the multicast transport on a task.Clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from oxide_cluster import config, providers, wire
from oxide_cluster.cgroups import OffProvider
from oxide_cluster.discovery import (
    DiscoveryService,
    DiscoverySettings,
    MulticastTransport,
    UdpTransport,
    parse_multicast_group,
)
from oxide_cluster.election import RedisLockBackend
from oxide_cluster.executor import ProcessRunner
from oxide_cluster.interfaces import (
    IClusterStateSource,
    IDiscoveryTransport,
    IElectionBackend,
    IOxideProvider,
    ITaskRunner,
)
from oxide_cluster.membership import MemoryPeerStore, PeerState
from oxide_cluster.redis_connection import RedisAddress, RedisConnection
from oxide_cluster.tap import Options

SECRET = "cluster-secret"
GROUP = ("239.1.2.3", 4002)


def load(**values: Any) -> config.Config:
    return config.load(values, {})


def test_builtin_providers_and_their_products_provide_the_interfaces():
    for provider in providers.BUILTIN:
        assert verifyObject(IOxideProvider, provider)
    clock = Clock()
    assert verifyObject(IDiscoveryTransport, UdpTransport(clock, 4001))
    assert verifyObject(IDiscoveryTransport, MulticastTransport(clock, 4001, GROUP))
    assert verifyObject(IElectionBackend,
                        RedisLockBackend(RedisConnection(
                            clock, RedisAddress.parse("redis://localhost:1"))))
    assert verifyObject(ITaskRunner, ProcessRunner(OffProvider()))


def test_defaults_choose_broadcast_standalone_process_and_redis_implies_redis():
    assert providers.chosen_names(load()) == {
        "discovery_transport": "broadcast", "election": "standalone", "runner": "process"}
    assert providers.chosen_names(load(redis="redis://h:6379"))["election"] == "redis"
    explicit = load(redis="redis://h:6379", election="standalone")
    assert providers.chosen_names(explicit)["election"] == "standalone"


def test_unknown_name_is_one_line_listing_the_installed_providers():
    with pytest.raises(config.ConfigError) as error:
        providers.select(load(discovery_transport="carrier-pigeon"), providers.BUILTIN)
    assert str(error.value) == ("unknown discovery_transport 'carrier-pigeon' "
                                "(installed: broadcast, codara, multicast, peers)")
    with pytest.raises(config.ConfigError, match=r"installed: redis, standalone\)"):
        providers.select(load(election="etcd"), providers.BUILTIN)


def test_standalone_election_beside_a_redis_queue_is_refused():
    with pytest.raises(config.ConfigError, match="'standalone' cannot run with 'redis'"):
        providers.select(load(redis="redis://h:6379", election="standalone"),
                         providers.BUILTIN)


def test_redis_election_keeps_the_cluster_state_in_redis_and_standalone_keeps_none():
    from oxide_cluster.cluster_queue import RedisQueueBackend
    from oxide_cluster.directory import TaskDirectory
    from oxide_cluster.suites import RedisSuiteDurations

    for provider in providers.BUILTIN:
        assert verifyObject(IClusterStateSource, provider)
    redis = load(redis="redis://127.0.0.1:6399/0", cluster_name="c1")
    state = providers.select(redis, providers.BUILTIN).cluster_state(Clock(), redis, "n1")
    assert state is not None
    assert isinstance(state.queue, RedisQueueBackend)
    assert state.queue.queue_key == "oxide:c1:queue"
    assert isinstance(state.directory, TaskDirectory)
    assert isinstance(state.suites, RedisSuiteDurations)
    # One connection for the three stores, put in the service tree by tap.py.
    assert isinstance(state.service, RedisConnection)
    assert state.queue._redis is state.service is state.directory._redis
    standalone = load()
    assert providers.select(standalone, providers.BUILTIN).cluster_state(
        Clock(), standalone, "n1") is None


def test_a_plugin_without_cluster_state_has_none():
    class Elsewhere:  # provides IOxideProvider only, not IClusterStateSource
        kind, name, options, description = "election", "etcd", (), "etcd leases"

        def factory(self, context: providers.ProviderContext) -> Any:
            return None

    found = providers.installed([Elsewhere()])
    loaded = load(election="etcd")
    assert providers.select(loaded, found).cluster_state(Clock(), loaded, "n1") is None


def test_peers_transport_has_no_cluster_addresses_and_broadcast_has_them():
    peers = UdpTransport(Clock(), 4001, interfaces=("10.0.0.255",), broadcast=False)
    peers.refresh()
    assert peers.cluster_addresses() == []
    broadcast = UdpTransport(Clock(), 4001, interfaces=("10.0.0.255",))
    broadcast.refresh()
    assert broadcast.cluster_addresses() == [("10.0.0.255", 4001)]


def test_redis_election_without_a_url_is_refused():
    with pytest.raises(config.ConfigError, match="election 'redis' needs a Redis URL"):
        providers.select(load(election="redis"), providers.BUILTIN)


def test_a_plugin_provider_is_selectable_with_its_own_options_parsed():
    built: list[providers.ProviderContext] = []
    plugin = providers.Provider(
        "discovery_transport", "tincan", lambda context: built.append(context) or "T",
        options=(config.Setting("tin_count", config._positive_int, 2, "tins"),))
    found = providers.installed([plugin])
    chosen = providers.select(load(discovery_transport="tincan",
                                   provider_options="tin_count=5"), found)
    assert chosen.build("discovery_transport", Clock(), load(), "n1") == "T"
    assert built[0].options == {"tin_count": 5}
    with pytest.raises(config.ConfigError, match=r"provider option 'tin_count'.*>= 1"):
        providers.select(load(discovery_transport="tincan",
                              provider_options="tin_count=0"), found)
    with pytest.raises(config.ConfigError, match=r"unknown provider option\(s\) colour "
                                                 r"\(the chosen providers take: tin_count\)"):
        providers.select(load(discovery_transport="tincan",
                              provider_options="colour=red"), found)


def test_a_plugin_cannot_take_a_builtin_name():
    impostor = providers.Provider("election", "redis", lambda context: None)
    found = providers.installed([impostor])
    assert [p for p in found if p.name == "redis"] == [
        p for p in providers.BUILTIN if p.name == "redis"]


def test_options_refuse_an_unknown_runner_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OXIDE_CONFIG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        Options().parseOptions(["--state-dir", str(tmp_path), "--runner", "docker"])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("oxide-cluster: cannot start: unknown runner 'docker' "
                               "(installed: process")
    assert len(lines) == 1


def test_help_lists_the_installed_providers():
    assert "discovery_transport: broadcast, codara, multicast, peers" in Options().getUsage()


@pytest.mark.parametrize("text, parsed", [
    ("239.1.2.3", ("239.1.2.3", 4002)), ("224.0.0.251:5353", ("224.0.0.251", 5353))])
def test_multicast_group_parses(text, parsed):
    assert parse_multicast_group(text) == parsed


@pytest.mark.parametrize("text", ["10.0.0.1", "239.1.2.3:0", "group", "239.1.2.3:x"])
def test_multicast_group_refuses_what_is_not_a_group(text):
    with pytest.raises(ValueError):
        parse_multicast_group(text)
    with pytest.raises(config.ConfigError, match="multicast_group"):
        load(multicast_group=text)


class FakeMulticastPort:
    """What ``listenMulticast`` hands out: records options and writes."""

    def __init__(self, port: int, protocol: Any, listen_multiple: bool) -> None:
        self.port, self.protocol, self.listen_multiple = port, protocol, listen_multiple
        self.ttl: int | None = None
        self.loopback: int | None = None
        self.joined: list[tuple[str, str]] = []
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.open = True

    def setTTL(self, ttl: int) -> None:
        self.ttl = ttl

    def setLoopbackMode(self, mode: int) -> None:
        self.loopback = mode

    def setOutgoingInterface(self, address: str) -> defer.Deferred[int]:
        return defer.succeed(1)

    def joinGroup(self, group: str, interface: str = "") -> defer.Deferred[int]:
        self.joined.append((group, interface))
        return defer.succeed(1)

    def write(self, data: bytes, address: tuple[str, int]) -> None:
        self.written.append((data, address))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "0.0.0.0", self.port)

    def stopListening(self) -> defer.Deferred[None]:
        self.open = False
        return defer.succeed(None)


class MulticastReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakeMulticastPort] = []

    def listenMulticast(self, port: int, protocol: Any, interface: str = "",
                        maxPacketSize: int = 8192, listenMultiple: bool = False) -> Any:
        fake = FakeMulticastPort(port, protocol, listenMultiple)
        self.ports.append(fake)
        return fake


def peer_body(node_id: str) -> dict[str, Any]:
    return {"node_id": node_id, "hostname": "h", "api_port": 8080, "services": [],
            "labels": {}, "version": "0.1.0", "started_at": 1.0,
            "stats": {"cpu_percent": 1.0, "memory_percent": 1.0, "load": [0, 0, 0],
                      "running_tasks": 0, "free_slots": 1}, "leader": None}


def test_multicast_transport_joins_announces_to_the_group_and_learns_from_it():
    reactor = MulticastReactor()
    transport = MulticastTransport(reactor, 4001, GROUP, ttl=3)
    service = DiscoveryService(reactor, DiscoverySettings(port=4001), lambda: peer_body("a"),
                               MemoryPeerStore(), SECRET, transport=transport)
    service.privilegedStartService()
    service.startService()
    unicast, group = reactor.ports
    assert (unicast.port, unicast.ttl, unicast.loopback) == (4001, 3, 1)
    assert group.port == 4002 and group.listen_multiple and group.joined == [("239.1.2.3", "")]
    reactor.advance(1.0)
    codec = wire.Codec.from_secret(SECRET, reactor)
    to_group = [codec.decode(data).type for data, address in unicast.written
                if address == GROUP]
    assert to_group[0] == wire.QUERY and to_group.count(wire.ANNOUNCE) >= 4
    assert group.written == []  # everything leaves from the node's own port

    # A peer's datagram to the group arrives on the group port with its unicast source.
    peer = codec.encode(wire.ANNOUNCE, "b", peer_body("b"))
    group.protocol.datagramReceived(peer, ("10.0.0.2", 4001))
    b = service.membership.get("b")
    assert b is not None and b.healthy
    assert (b.ip_address, b.discovery_port) == ("10.0.0.2", 4001)
    # It stops being heard: declared dead after dead_after.
    reactor.advance(3.0)
    assert service.membership.get("b").state is PeerState.DEAD
    stopped = service.stopService()
    assert stopped.called and not unicast.open and not group.open

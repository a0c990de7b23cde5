"""One conformance suite per interface, run against every built-in provider (and the demo).

Each test is written once against the interface and parametrised by provider name; a
provider is always built the way a node builds it (``providers.select(config).build``), on
the real reactor, with real sockets, a real ``redis-server`` and real child processes.
A new provider joins by adding its name (and how to build a pair of it) below.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import psutil
import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from zope.interface.verify import verifyObject

from oxide_cluster import config, providers, wire
from oxide_cluster.cgroups import Resources
from oxide_cluster.cluster_queue import QueueBackend
from oxide_cluster.discovery import DiscoveryService, DiscoverySettings
from oxide_cluster.interfaces import (
    ClusterDirectory,
    IDiscoveryTransport,
    IElectionBackend,
    ITaskRunner,
)
from oxide_cluster.membership import MemoryPeerStore, PeerState
from oxide_cluster.suites import SuiteDurations
from tests.integration.test_providers import _loopback_multicast_works
from tests.support import REPO_ROOT, free_port

DEMO = REPO_ROOT / "docs" / "examples" / "oxide-unixdgram"
HOST = "127.0.0.1"
SECRET = "conformance-secret"


def reactor() -> Any:
    from twisted.internet import reactor as global_reactor

    return global_reactor


async def eventually(condition: Callable[[], Any], timeout: float = 5.0,
                     message: str = "condition") -> Any:
    """Poll ``condition`` on the running reactor until truthy; fail after ``timeout``."""
    deadline = reactor().seconds() + timeout
    while True:
        value = condition()
        if value:
            return value
        if reactor().seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await task.deferLater(reactor(), 0.02, lambda: None)


# -- building providers as a node does ------------------------------------------------


def demo_plugin(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The demo's own ``twisted/plugins`` declaration, loaded from its file."""
    monkeypatch.syspath_prepend(str(DEMO))
    path = DEMO / "twisted" / "plugins" / "oxide_unixdgram_plugin.py"
    spec = importlib.util.spec_from_file_location("oxide_unixdgram_plugin_conformance", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.unixdgram


def build(kind: str, values: dict[str, Any], found: list[Any] | None = None,
          node_id: str = "n1") -> Any:
    loaded = config.load(values, {})
    return providers.select(loaded, found).build(kind, reactor(), loaded, node_id,
                                                 local_node=lambda: announce_body(node_id))


@attrs.frozen
class TransportPair:
    a: Any
    b: Any
    ports: tuple[int, int]
    #: A datagram to A's cluster addresses reaches B on this one host (broadcast needs
    #: a shared port, so its cluster sends are covered by the netns suite instead).
    cluster_reaches_peer: bool


TRANSPORTS = ["broadcast", "peers", "multicast", "codara", "unixdgram"]


def transport_pair(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                   ) -> TransportPair:
    ports = (free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM))
    found: list[Any] | None = None
    extra: dict[str, Any] = {}
    if name == "multicast":
        group_port = free_port(socket.SOCK_DGRAM)
        group = f"239.255.{os.getpid() % 250}.{group_port % 250 + 1}"
        if not _loopback_multicast_works(group, free_port(socket.SOCK_DGRAM)):
            pytest.skip("this host has no multicast on loopback")
        extra = {"multicast_group": f"{group}:{group_port}", "multicast_interface": HOST}
    elif name == "unixdgram":
        found = providers.installed([demo_plugin(monkeypatch)])
        extra = {"provider_options": f"unix_dir={tmp_path / 'socks'}"}
    a, b = (build("discovery_transport",
                  {"discovery_transport": name, "discovery_port": port, **extra}, found)
            for port in ports)
    return TransportPair(a, b, ports, cluster_reaches_peer=name in ("multicast", "unixdgram"))


@pytest.fixture(params=TRANSPORTS)
def transports(request, tmp_path, monkeypatch):
    pair = transport_pair(request.param, tmp_path, monkeypatch)
    yield pair
    for transport in (pair.a, pair.b):
        transport.close()  # harmless when already closed


class Inbox:
    """What a bound transport delivered."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    def __call__(self, datagram: bytes, sender: tuple[str, int]) -> None:
        self.received.append((datagram, sender))

    def has(self, datagram: bytes) -> list[tuple[str, int]]:
        return [sender for data, sender in self.received if data == datagram]


# -- IDiscoveryTransport --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_transport_binds_its_port_and_a_datagram_to_one_peer_arrives_intact(transports):
    pair = transports
    assert verifyObject(IDiscoveryTransport, pair.a)
    inbox_a, inbox_b = Inbox(), Inbox()
    assert pair.a.bind(inbox_a) == pair.ports[0]
    assert pair.b.bind(inbox_b) == pair.ports[1]
    # The largest datagram discovery ever sends, byte for byte.
    datagram = os.urandom(wire.MAX_DATAGRAM // 2).hex().encode()[:wire.MAX_DATAGRAM]
    pair.a.send(datagram, (HOST, pair.ports[1]))
    senders = await eventually(lambda: inbox_b.has(datagram), message="B to receive")
    # The sender is an (ip, port) pair that reaches A back: membership records it.
    assert senders == [(HOST, pair.ports[0])]
    assert all(isinstance(part, t) for part, t in zip(senders[0], (str, int), strict=True))
    pair.b.send(b"reply", senders[0])
    await eventually(lambda: inbox_a.has(b"reply"), message="A to receive the reply")


@pytest_twisted.ensureDeferred
async def test_transport_cluster_addresses_are_addresses_and_reach_the_peer(transports):
    pair = transports
    inbox_b = Inbox()
    pair.a.bind(Inbox())
    pair.b.bind(inbox_b)
    pair.a.refresh()
    pair.b.refresh()
    cluster = pair.a.cluster_addresses()
    assert isinstance(cluster, list)
    assert all(isinstance(host, str) and isinstance(port, int) for host, port in cluster)
    assert (HOST, pair.ports[0]) not in cluster  # never to ourselves as "the cluster"
    assert isinstance(pair.a.reaches((HOST, pair.ports[1])), bool)
    if not pair.cluster_reaches_peer:
        return
    for number, address in enumerate(cluster):
        pair.a.send(b"to all %d" % number, address)
    await eventually(lambda: any(data.startswith(b"to all") for data, _ in inbox_b.received),
                     message="a datagram to the cluster to reach B")


@pytest_twisted.ensureDeferred
async def test_transport_close_fires_frees_the_port_and_is_idempotent(transports, tmp_path,
                                                                      monkeypatch):
    pair = transports
    assert (await pair.a.close()) is None  # never bound: nothing to close
    pair.a.bind(Inbox())
    closed = pair.a.close()
    assert isinstance(closed, defer.Deferred)
    await closed
    await pair.a.close()
    # The same port binds again at once: a restarted node gets its address back.
    again = Inbox()
    pair.a.bind(again)
    pair.b.bind(Inbox())
    pair.b.send(b"after restart", (HOST, pair.ports[0]))
    await eventually(lambda: again.has(b"after restart"), message="the rebound port")


def announce_body(node_id: str) -> dict[str, Any]:
    return {"node_id": node_id, "hostname": "h", "api_port": 8080, "services": [],
            "labels": {}, "version": "0.1.0", "started_at": 1.0,
            "stats": {"cpu_percent": 1.0, "memory_percent": 1.0, "load": [0, 0, 0],
                      "running_tasks": 0, "free_slots": 1}, "leader": None}


@pytest_twisted.ensureDeferred
async def test_two_discovery_services_over_the_transport_join_and_see_the_leave(transports):
    """Membership is transport-free: the same service finds its peer over every provider."""
    pair = transports
    services = []
    for index, (transport, name) in enumerate(((pair.a, "a"), (pair.b, "b"))):
        other = pair.ports[1 - index]
        # Static peers where the cluster is not reachable on one host (broadcast, peers).
        peers = () if pair.cluster_reaches_peer else (f"{HOST}:{other}",)
        settings = DiscoverySettings(port=pair.ports[index], peers=peers)
        services.append(DiscoveryService(reactor(), settings,
                                         lambda name=name: announce_body(name),
                                         MemoryPeerStore(), SECRET, transport=transport))
    a, b = services
    for service in services:
        service.privilegedStartService()
        service.startService()
    try:
        for service, other in ((a, "b"), (b, "a")):
            await eventually(lambda s=service, o=other: (peer := s.membership.get(o))
                             is not None and peer.healthy,
                             message=f"{other} to be heard")
        assert (a.membership.get("b").ip_address, a.membership.get("b").discovery_port) \
            == (HOST, pair.ports[1])
        await b.stopService()
        await eventually(lambda: a.membership.get("b").state is PeerState.LEFT,
                         message="b's leave")
    finally:
        for service in services:
            if service.running:
                await service.stopService()


# -- the election provider (elector) and its IElectionBackend -----------------------------


ELECTIONS = ["standalone", "redis"]


@pytest.fixture(params=ELECTIONS)
def election(request):
    values: dict[str, Any] = {"election": request.param, "leader_ttl": 1.0,
                              "cluster_name": f"conf{os.getpid()}"}
    if request.param == "redis":
        values["redis"] = request.getfixturevalue("redis").url
    return request.param, values


@pytest_twisted.ensureDeferred
async def test_elector_of_a_lone_node_leads_with_a_token_and_refuses_older_ones(election):
    name, values = election
    elector = build("election", values, node_id="solo")
    elector.startService()
    try:
        assert await eventually(lambda: elector.is_leader, timeout=10,
                                message=f"{name} to lead")
        leader = elector.leader()
        assert leader["node_id"] == "solo"
        assert isinstance(leader["token"], int) and leader["token"] >= 1
        assert isinstance(leader["since"], float)
        token = leader["token"]
        assert elector.current_token_valid(token)
        assert elector.observe_token(token)
        assert not elector.observe_token(token - 1)  # a deposed leader's fencing token
        seen: list[dict[str, Any]] = []
        elector.subscribe(seen.append)  # every elector takes subscribers
    finally:
        await defer.maybeDeferred(elector.stopService)


BACKENDS = ["redis"]  # election providers that run on an IElectionBackend


@pytest.fixture(params=BACKENDS)
def backend(request):
    values = {"election": request.param, "leader_ttl": 1.0,
              "redis": request.getfixturevalue("redis").url}
    elector = build("election", values)
    # The backend's connection may be a service of the elector's (redis): start them.
    for child in getattr(elector, "services", []):
        child.startService()
    yield elector.backend
    for child in getattr(elector, "services", []):
        child.stopService()


@pytest_twisted.ensureDeferred
async def test_backend_lease_is_held_by_one_value_renewed_and_released_by_it(backend):
    assert verifyObject(IElectionBackend, backend)
    key = f"conf:{os.getpid()}:lease"
    try:
        assert await backend.acquire(key, "a:1", 5000) is True
        assert await backend.acquire(key, "b:2", 5000) is False
        assert await backend.get(key) == "a:1"
        assert await backend.renew(key, "b:2", 5000) is False
        assert await backend.renew(key, "a:1", 5000) is True
        assert await backend.release(key, "b:2") is False
        assert await backend.release(key, "a:1") is True
        assert await backend.get(key) is None
        assert await backend.acquire(key, "b:2", 200) is True
        await task.deferLater(reactor(), 0.3, lambda: None)
        assert await backend.acquire(key, "c:3", 5000) is True  # an expired lease is free
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_backend_tokens_only_grow_and_rise_above_the_floor(backend):
    key = f"conf:{os.getpid()}:epoch"
    try:
        first, _ = await backend.next_token(key, 0, 100)
        second, _ = await backend.next_token(key, 0, 100)
        assert second > first
        lifted, fresh = await backend.next_token(key, second + 10, 100)
        assert lifted > second + 10 and fresh is True  # below the floor: the epoch was lost
        assert all(isinstance(v, int) for v in (first, second, lifted))
    finally:
        await backend.close()


def _missing(store: Any, protocol: type) -> list[str]:
    """The protocol's methods that ``store`` lacks (typing.Protocol checks no values)."""
    wanted = [name for name, value in vars(protocol).items()
              if callable(value) and not name.startswith("_")]
    return [name for name in wanted if not callable(getattr(store, name, None))]


@pytest_twisted.ensureDeferred
async def test_cluster_state_is_none_or_every_store_and_they_keep_the_queue(election):
    name, values = election
    loaded = config.load(values, {})
    state = providers.select(loaded).cluster_state(reactor(), loaded, "n1")
    if state is None:
        return  # no durable cluster state: tasks queue in each node's own store
    for store, protocol in ((state.queue, QueueBackend), (state.directory, ClusterDirectory),
                            (state.suites, SuiteDurations)):
        assert store is not None, f"{name}: no {protocol.__name__}"
        assert not _missing(store, protocol), f"{name}: {protocol.__name__} lacks them"
    task_id = f"conf-{os.getpid()}"
    record = {"id": task_id, "priority": 0, "group": "default", "request": {}}
    if state.service is not None:
        state.service.startService()
    try:
        seq = await state.queue.enqueue(task_id, record)
        assert seq >= 1
        assert await state.queue.enqueue(task_id, record) == 0  # known: never twice
        assert await state.queue.waiting() is True
        entry = await state.queue.where(task_id)
        assert entry is not None and entry.state == "queued" and entry.record == record
        assert await state.queue.claim(task_id, "n1") is None
        assert await state.queue.claim(task_id, "n2") is not None  # exactly once
        assert await state.queue.states([task_id, f"{task_id}-unknown"]) == ["started", None]
        key = f"{task_id}-key"
        assert await state.queue.hold_key(key, task_id, 60) == task_id
        assert await state.queue.hold_key(key, "other", 60) == task_id  # held: names the first
        assert await state.queue.release_key(key, "other") is False  # not its task: kept
        assert await state.queue.release_key(key, task_id) is True
        assert await state.queue.hold_key(key, "other", 60) == "other"  # free again
        await state.suites.put("conformance", {"tests/test_a.py": 1.5})
        assert await state.suites.get("conformance") == {"tests/test_a.py": 1.5}
    finally:
        if state.service is not None:
            await state.service.stopService()


# -- ITaskRunner ----------------------------------------------------------------------


RUNNERS = ["process:off", "process:v1", "process:v2"]


@pytest.fixture(params=RUNNERS)
def runner(request):
    name, mode = request.param.split(":")
    try:
        built = build("runner", {"runner": name, "cgroups": mode},
                      node_id=f"conf{os.getpid()}")
    except config.ConfigError as error:
        pytest.skip(f"{request.param} is not available on this host: {error}")
    yield built
    built.cgroups.close()


class Child(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[Any] = defer.Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


def spawn(runner: Any, script: str, tty: bool = False,
          cgroup: Any = None) -> tuple[Any, Child]:
    child = Child()
    procs = tuple(cgroup.procs_files) if cgroup is not None else ()
    transport = runner.spawn(reactor(), child, "/bin/sh", ["sh", "-c", script],
                             {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, None,
                             tty=tty, cgroup_procs=procs)
    return transport, child


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest_twisted.ensureDeferred
async def test_runner_reports_the_exit_code_of_its_process(runner):
    assert verifyObject(ITaskRunner, runner)
    _, child = spawn(runner, "echo out; exit 3")
    ended = await child.ended
    assert isinstance(ended, ProcessTerminated) and ended.exitCode == 3
    assert child.output == b"out\n"


@pytest_twisted.ensureDeferred
async def test_runner_signal_reaches_the_whole_process_tree(runner):
    cgroup = runner.cgroups.create(f"conf-{os.getpid()}", Resources())
    try:
        transport, child = spawn(runner, "sleep 300 & echo $!; wait", cgroup=cgroup)
        await eventually(lambda: child.output.endswith(b"\n"), message="the grandchild pid")
        grandchild = int(child.output)
        assert os.getpgid(transport.pid) == transport.pid  # it leads its own group
        assert os.getpgid(grandchild) == transport.pid
        if cgroup is not None:  # both entered the task's cgroup before exec
            for procs in cgroup.procs_files:
                members = set(Path(procs).read_text().split())
                assert {str(transport.pid), str(grandchild)} <= members
        runner.signal(transport.pid, signal.SIGTERM)
        ended = await child.ended
        assert ended.signal == signal.SIGTERM
        await eventually(lambda: _gone(grandchild), message="the grandchild to die")
    finally:
        if cgroup is not None:
            cgroup.kill()
            await eventually(lambda: not cgroup.populated(), message="an empty cgroup")
            cgroup.remove()


@pytest_twisted.ensureDeferred
async def test_runner_gives_a_tty_task_a_terminal(runner):
    if sys.platform != "linux":
        pytest.skip("pseudo-terminals are tested on Linux")
    _, child = spawn(runner, "[ -t 1 ] && echo tty || echo notty", tty=True)
    await child.ended
    assert child.output.strip() == b"tty"
    _, plain = spawn(runner, "[ -t 1 ] && echo tty || echo notty")
    await plain.ended
    assert plain.output.strip() == b"notty"

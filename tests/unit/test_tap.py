"""Start-up of the service tree: listeners bind first, a failure is one line and an exit."""

from __future__ import annotations

import errno
import re
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from oxide_cluster import config as config_module
from oxide_cluster import providers
from oxide_cluster.api import ApiRequest
from oxide_cluster.cluster_queue import AdmittedWatch, ClusterDispatcher
from oxide_cluster.election import StandaloneElector
from oxide_cluster.identity import StateDirLock
from oxide_cluster.interfaces import ClusterState
from oxide_cluster.model import Task
from oxide_cluster.store import StoreError
from oxide_cluster.tap import (
    BindOption,
    HttpListener,
    NodeService,
    Options,
    StartupRefused,
    _RecoverThenRun,
    build_node,
)
from tests.unit.test_cluster_queue import FakeQueue


class _Recorder(service.Service):
    """A child that records which start steps ran."""

    def __init__(self, steps: list[str], name: str) -> None:
        self._steps = steps
        self._name = name

    def privilegedStartService(self) -> None:
        self._steps.append(f"{self._name} bind")

    def startService(self) -> None:
        super().startService()
        self._steps.append(f"{self._name} start")


class _TakenPort(service.Service):
    def privilegedStartService(self) -> None:
        raise CannotListenError("0.0.0.0", 4001,
                                OSError(errno.EADDRINUSE, "Address already in use"))


def _node_service(tmp_path) -> tuple[NodeService, StateDirLock]:
    lock = StateDirLock(tmp_path)
    lock.acquire()
    return NodeService(lock, "n1", tmp_path), lock


def test_a_taken_port_stops_start_up_before_any_service_starts(tmp_path):
    top, lock = _node_service(tmp_path)
    steps: list[str] = []
    _Recorder(steps, "store").setServiceParent(top)
    top.add_listener(_TakenPort(), BindOption("discovery_port", "4001", "--discovery-port"))
    _Recorder(steps, "http").setServiceParent(top)
    with capturedLogs() as events, pytest.raises(StartupRefused):
        top.privilegedStartService()
    assert steps == ["store bind"]  # nothing started, the next listener never bound
    problems = [e for e in events if e["log_level"] >= LogLevel.warn]
    assert len(problems) == 1 and "log_failure" not in problems[0]
    assert problems[0]["log_level"] == LogLevel.critical
    assert problems[0]["problem"] == (
        "discovery_port 4001: address already in use "
        "(another node on this host? give each node its own --discovery-port)")
    assert lock._handle is None  # released: a restarted node can take the state dir


def test_bind_option_names_the_cause_for_other_errors():
    option = BindOption("listen", "tcp:80", "--listen port")
    denied = CannotListenError("", 80, OSError(errno.EACCES, "Permission denied"))
    assert option.problem(denied) == ("listen tcp:80: permission denied "
                                      "(ports below 1024 need root or CAP_NET_BIND_SERVICE)")
    assert option.problem(OSError(errno.ENOENT, "No such file or directory")) == (
        "listen tcp:80: no such file or directory")


def test_http_listener_binds_at_privileged_start_and_logs_its_url_after(tmp_path):
    reactor = MemoryReactorClock()
    endpoint = endpoints.serverFromString(reactor, "tcp:4321")
    listener = HttpListener(endpoint, Site(Resource()), "http", "203.0.113.7")
    top, _ = _node_service(tmp_path)
    top.add_listener(listener, BindOption("listen", "tcp:4321", "--listen port"))
    with capturedLogs() as events:
        top.privilegedStartService()
        assert reactor.tcpServers and not events  # bound, nothing said yet
        top.startService()
    # A wildcard address is no URL anyone can open: the host's address stands in.
    assert listener.url() == "http://203.0.113.7:4321/"
    said = [e for e in events if e.get("url")]
    assert said and said[0]["dashboard"] == "http://203.0.113.7:4321/ui/"
    assert said[0]["node_id"] == "n1"
    top._lock.release()


def test_http_listener_url_brackets_ipv6():
    reactor = MemoryReactorClock()
    endpoint = endpoints.serverFromString(reactor, r"tcp6:4321:interface=\:\:1")
    listener = HttpListener(endpoint, Site(Resource()), "https", "unused")
    listener.privilegedStartService()
    assert listener.url() == "https://[::1]:4321/"


def test_no_discovery_help_reads_the_right_way_round():
    help_text = {flag[0]: flag[2] for flag in Options.optFlags}["no-discovery"]
    assert help_text.startswith("turn off UDP discovery")
    assert "default: True" not in help_text and "on by default" in help_text


def test_options_refuse_a_state_dir_under_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OXIDE_CONFIG", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        Options().parseOptions(["--state-dir", str(blocker / "state")])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert re.search(r"^oxide-cluster: cannot start: .*state_dir .*file/state: Not a directory",
                     lines[0])


@pytest.mark.parametrize("url", ["localhost:6379", "redis://host:port", "redis://h/db"])
def test_options_refuse_a_bad_redis_url(tmp_path, url, capsys):
    with pytest.raises(SystemExit) as exit_info:
        Options().parseOptions(["--state-dir", str(tmp_path), "--redis", url])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith(
        "oxide-cluster: cannot start: bad value for 'redis'")


@pytest.mark.parametrize("status, phrase", [
    (429, b"Too Many Requests"), (422, b"Unprocessable Entity"),
    (426, b"Upgrade Required"), (404, b"Not Found"),
])
def test_every_status_line_has_its_reason_phrase(status, phrase):
    class Status(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setResponseCode(status)
            return b"{}"

    channel = Site(Status(), requestFactory=ApiRequest).buildProtocol(
        ("127.0.0.1", 1))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status_line = transport.value().split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 %d %s" % (status, phrase)
    channel.connectionLost(None)


def test_a_form_encoded_body_is_not_read_as_query_arguments():
    """The API takes JSON: a POST body is never parsed as a form (``?wait`` and the
    like come from the query string only)."""
    seen = {}

    class Echo(Resource):
        isLeaf = True

        def render_POST(self, request):
            seen["args"] = dict(request.args)
            seen["body"] = request.content.read()
            return b"{}"

    channel = Site(Echo(), requestFactory=ApiRequest).buildProtocol(("127.0.0.1", 1))
    channel.makeConnection(StringTransport())
    body = b"wait=30"
    channel.dataReceived(b"POST /execute?x=1 HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert seen == {"args": {b"x": [b"1"]}, "body": b"wait=30"}
    channel.connectionLost(None)



class _Executor:
    def startService(self) -> None:
        pass

    async def recover(self) -> None:
        raise AssertionError("must not recover without a store")


class _Scheduler:
    async def recover(self) -> None:
        raise AssertionError("must not restore the queue without a store")


class _Store:
    def __init__(self, error: Exception) -> None:
        self.opened = defer.fail(error)


@pytest.mark.parametrize("error, one_line", [
    (StoreError("cannot open the store s/oxide.sqlite3: file is not a database"), True),
    (RuntimeError("a bug"), False),  # not an operator's problem: keep the traceback
])
def test_an_unopenable_store_stops_the_node_with_status_1(tmp_path, error, one_line):
    exits: list[int] = []
    starter = _RecoverThenRun(_Store(error), _Executor(), _Scheduler(), exits.append, tmp_path)
    with capturedLogs() as events:
        starter.startService()
    assert exits == [1]
    (said,) = [e for e in events if e["log_level"] >= LogLevel.warn]
    assert ("log_failure" not in said) is one_line
    if one_line:
        assert said["problem"] == error.args[0] and said["state_dir"] == tmp_path


# -- the cluster state comes from the election provider --------------------------------


class _Directory:
    """A ClusterDirectory that only records what the node asks of it."""

    def __init__(self) -> None:
        self.changed: list[Task] = []

    def task_changed(self, task: Task) -> None:
        self.changed.append(task)

    def recorded(self, task_id: str) -> defer.Deferred[Any]:
        return defer.succeed(None)

    async def unfinished(self, node_id: str) -> list[dict[str, Any]]:
        return []

    async def record_lost(self, record: dict[str, Any]) -> None:
        pass

    async def record_retried(self, record: dict[str, Any]) -> None:
        pass

    async def lost(self, task_id: str) -> dict[str, Any] | None:
        return None


class _Suites:
    def get(self, suite: str) -> defer.Deferred[dict[str, float] | None]:
        return defer.succeed({"tests/test_a.py": 4.5})

    def put(self, suite: str, durations: dict[str, float]) -> defer.Deferred[None]:
        return defer.succeed(None)


def _fired(deferred: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired (in-memory collaborators only)."""
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def _build(tmp_path, monkeypatch, plugins: list[Any], **values: Any):
    monkeypatch.setattr(providers, "_plugins", lambda: plugins)
    loaded = config_module.load({"state_dir": str(tmp_path), "secret": "s",
                                 "discovery": False, "listen": "tcp:0", **values}, {})
    reactor = MemoryReactorClock()
    top, node = build_node(loaded, reactor)
    return reactor, top, node


def test_build_node_takes_the_cluster_queue_directory_and_suites_from_the_election_provider(
        tmp_path, monkeypatch):
    connection = service.Service()
    state = ClusterState(queue=FakeQueue(), directory=_Directory(), suites=_Suites(),
                         service=connection)
    asked: list[providers.ProviderContext] = []
    plugin = providers.Provider(
        "election", "ledger", lambda context: StandaloneElector(context.reactor,
                                                                context.node_id),
        cluster_state=lambda context: asked.append(context) or state)
    reactor, top, node = _build(tmp_path, monkeypatch, [plugin], election="ledger")
    try:
        assert [context.node_id for context in asked] == [node.node_id]
        (dispatcher,) = [child for child in top if isinstance(child, ClusterDispatcher)]
        assert dispatcher._backend is state.queue
        (watch,) = [child for child in top if isinstance(child, AdmittedWatch)]
        assert watch._backend is state.queue
        assert state.directory.task_changed in node.executor.state_listeners
        # The connection is a service, right after the store: up before anything uses
        # it, stopped after everything else; no reactor triggers beside the tree.
        assert list(top)[:2] == [node.store, connection]
        assert not reactor.whenRunningHooks
        assert not reactor.triggers.get("after", {}).get("shutdown")
        (listener,) = [child for child in top if isinstance(child, HttpListener)]
        client = StubTreq(listener._factory.resource)
        response = _fired(client.get("http://n/suites/unit/durations",
                                               headers={"X-Cluster-Secret": "s"}))
        assert response.code == 200
        body = _fired(response.json())
        assert body["durations"] == {"tests/test_a.py": 4.5}
    finally:
        top._lock.release()


def test_build_node_without_cluster_state_keeps_the_queue_in_the_node_store(
        tmp_path, monkeypatch):
    plugin = providers.Provider(
        "election", "ledger", lambda context: StandaloneElector(context.reactor,
                                                                context.node_id))
    reactor, top, _node = _build(tmp_path, monkeypatch, [plugin], election="ledger")
    try:
        assert not [child for child in top
                    if isinstance(child, (ClusterDispatcher, AdmittedWatch))]
        assert not reactor.triggers.get("after", {}).get("shutdown")  # no directory
    finally:
        top._lock.release()


def test_the_peer_client_is_a_service_after_discovery_and_no_trigger_is_left_beside_the_tree(
        tmp_path, monkeypatch):
    from oxide_cluster.discovery import DiscoveryService
    from oxide_cluster.forwarding import PeerClient

    reactor, top, node = _build(tmp_path, monkeypatch, [], discovery=True,
                                discovery_port=0)
    try:
        children = list(top)
        (peers,) = [child for child in children if isinstance(child, PeerClient)]
        (discovery,) = [child for child in children if isinstance(child, DiscoveryService)]
        assert children.index(peers) == children.index(discovery) + 1
        assert discovery.membership is node.membership is peers._membership
        assert not reactor.whenRunningHooks
        assert not any(reactor.triggers.values())
    finally:
        top._lock.release()


def test_collaborators_are_given_at_construction_and_reach_the_api(tmp_path, monkeypatch):
    """Discovery announces the node built before it; the node, peers, blobs from peers and
    discovery share one membership table; /ready, /stats and /metrics read discovery and
    the hub that ``build_node`` handed to the API."""
    from prometheus_client import generate_latest

    from oxide_cluster.discovery import DiscoveryService
    from oxide_cluster.forwarding import PeerClient
    from oxide_cluster.workspace import PeerBlobs, Workspaces

    _reactor, top, node = _build(tmp_path, monkeypatch, [], discovery=True, discovery_port=0,
                                listen="tcp:4123:interface=127.0.0.1")
    try:
        children = list(top)
        (discovery,) = [child for child in children if isinstance(child, DiscoveryService)]
        (peers,) = [child for child in children if isinstance(child, PeerClient)]
        (workspaces,) = [child for child in children if isinstance(child, Workspaces)]
        assert (node.api_port, node.ip_address) == (4123, "127.0.0.1")
        assert discovery.local_node == node.announcement
        assert discovery.local_node()["api_port"] == 4123
        assert discovery.membership is node.membership
        assert isinstance(workspaces.source, PeerBlobs) and workspaces.source._peers is peers
        (listener,) = [child for child in children if isinstance(child, HttpListener)]
        client = StubTreq(listener._factory.resource)
        headers = {"X-Cluster-Secret": "s"}
        ready = _fired(_fired(client.get("http://n/ready", headers=headers)).json())
        assert ready["checks"]["discovery"] is False  # nothing bound: nothing started
        stats = _fired(_fired(client.get("http://n/stats", headers=headers)).json())
        assert stats["discovery"]["sent"]["announce"] == 0
        text = generate_latest(listener._factory._metrics.registry).decode()
        assert "oxide_discovery_datagrams_total" in text
        assert "oxide_websocket_clients 0.0" in text
    finally:
        top._lock.release()


def test_without_discovery_the_node_has_no_peers_and_the_api_no_discovery(
        tmp_path, monkeypatch):
    from oxide_cluster.workspace import Workspaces

    _reactor, top, node = _build(tmp_path, monkeypatch, [])
    try:
        assert node.membership is None and node.peers_json() == []
        (workspaces,) = [child for child in top if isinstance(child, Workspaces)]
        assert workspaces.source is None
        (listener,) = [child for child in top if isinstance(child, HttpListener)]
        client = StubTreq(listener._factory.resource)
        headers = {"X-Cluster-Secret": "s"}
        ready = _fired(_fired(client.get("http://n/ready", headers=headers)).json())
        assert "discovery" not in ready["checks"]
    finally:
        top._lock.release()


def test_the_service_tree_starts_in_dependency_order_and_stops_in_reverse(
        tmp_path, monkeypatch):
    """Construction order is free; the start order is the tree's (stop: its reverse):
    store and Redis first, discovery before its peer client, the drain last."""
    state = ClusterState(queue=FakeQueue(), directory=_Directory(), suites=_Suites(),
                         service=service.Service())
    plugin = providers.Provider(
        "election", "ledger", lambda context: StandaloneElector(context.reactor,
                                                                context.node_id),
        cluster_state=lambda context: state)
    _reactor, top, _node = _build(tmp_path, monkeypatch, [plugin], election="ledger",
                                  discovery=True, discovery_port=0)
    try:
        assert [type(child).__name__ for child in top] == [
            "Store", "Service", "StatsSampler", "BlobStore", "Workspaces", "Retention",
            "_RecoverThenRun", "Scheduler", "StandaloneElector", "DiscoveryService",
            "PeerClient", "ClusterDispatcher", "AdmittedWatch", "LiveHub", "HttpListener",
            "DrainOnStop"]
    finally:
        top._lock.release()

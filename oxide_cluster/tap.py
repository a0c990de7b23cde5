"""``twistd oxide-cluster``: command-line options and the node's service tree."""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, Protocol

import attrs
from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.server import Site

from oxide_cluster import config as config_module
from oxide_cluster import logs, providers
from oxide_cluster.api import TaskApi
from oxide_cluster.capacity import Capacity, host_allocatable
from oxide_cluster.cas import BlobStore
from oxide_cluster.cas_http import UploadRequest
from oxide_cluster.cgroups import describe_isolation
from oxide_cluster.cluster_queue import (
    AdmittedWatch,
    ClusterAdmission,
    ClusterDispatcher,
    ClusterQueue,
    PeerLocator,
    QueueBackend,
)
from oxide_cluster.config import Config, ConfigError
from oxide_cluster.discovery import DiscoveryService, DiscoverySettings, new_membership
from oxide_cluster.drain import Drain, DrainOnStop
from oxide_cluster.election import RedisAddress
from oxide_cluster.executor import Executor
from oxide_cluster.forwarding import PeerClient
from oxide_cluster.identity import (
    StateDirLock,
    load_node_id,
    prepare_state_dir,
    resolve_secret,
)
from oxide_cluster.membership import Membership
from oxide_cluster.metrics import MeteredSite
from oxide_cluster.model import Task, TaskState, parse_task_request
from oxide_cluster.node import Node, primary_ipv4
from oxide_cluster.placement import Candidate, Placement
from oxide_cluster.protection import User, protect_agent
from oxide_cluster.recovery import Recovery
from oxide_cluster.retention import Retention
from oxide_cluster.routing import RouterSettings, TaskRouter
from oxide_cluster.scheduler import LabelBook, Room, Scheduler
from oxide_cluster.stats import StatsSampler
from oxide_cluster.store import Store, StoreError
from oxide_cluster.suites import StoreSuiteDurations, SuiteDurations
from oxide_cluster.workspace import PeerBlobs, Workspaces
from oxide_cluster.ws import LiveFactory, LiveHub

log = Logger()


def _option_table() -> tuple[list[list[Any]], list[list[Any]]]:
    parameters, flags = [], []
    for setting in config_module.SETTINGS:
        if setting.parse is config_module._flag:
            # The option is the negation, so "[default: True]" after it would read backwards.
            flags.append([f"no-{setting.option}", None,
                          f"turn off {setting.help}, which is on by default "
                          f"(env {setting.env_name}=false does the same)"])
            continue
        default = setting.default
        shown = f" [default: {default!r}]" if default not in (None, (), {}) else ""
        parameters.append([setting.option, None, None,
                           f"{setting.help} (env {setting.env_name}){shown}"])
    return parameters, flags


class Options(usage.Options):
    """Options of ``twistd oxide-cluster``; every one also has a YAML key and OXIDE_ name."""

    optParameters, optFlags = _option_table()
    optParameters = [
        ["config", "c", None, "YAML configuration file (env OXIDE_CONFIG)"],
        *optParameters,
    ]

    def postOptions(self) -> None:
        command_line: dict[str, Any] = {}
        for setting in config_module.SETTINGS:
            if setting.parse is config_module._flag:
                if self.get(f"no-{setting.option}"):
                    command_line[setting.name] = False
            elif self.get(setting.option) is not None:
                command_line[setting.name] = self[setting.option]
        try:
            self.config = config_module.load(command_line, os.environ, self["config"])
            check_usable(self.config)
        except ConfigError as error:
            # One line, not twistd's page of usage: the option is known, its value is not.
            sys.stderr.write(f"oxide-cluster: cannot start: {error}\n")
            raise SystemExit(1) from None
        logs.use_config(getattr(self, "parent", None), self.config.log_format)

    def getUsage(self, width: int | None = None) -> str:
        """The options, then the providers installed now (built-in and plugins)."""
        return (super().getUsage(width)
                + f"\nInstalled providers: {providers.describe()}.\n")


def check_usable(config: Config) -> None:
    """Catch what makes start-up fail before twistd starts anything: an unusable state
    dir, a Redis URL that does not parse."""
    prepare_state_dir(config.state_dir)
    if config.redis:
        try:
            RedisAddress.parse(config.redis)
        except ValueError as error:
            raise ConfigError(f"bad value for 'redis': {error}") from None
    providers.select(config)  # an unknown name: one line listing the installed ones


class StartupRefused(Exception):
    """The node cannot start; the one line saying why is already logged.

    An ordinary exception, so twistd still removes its pidfile and tells a daemonizing
    parent (which would otherwise wait forever); :func:`makeService` keeps Python from
    printing its traceback.
    """


def _quiet_refusals(previous: Any) -> Any:
    """A ``sys.excepthook`` that stays silent for :class:`StartupRefused`."""

    def hook(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
        if not issubclass(kind, StartupRefused):
            previous(kind, value, traceback)

    return hook


@attrs.frozen
class BindOption:
    """The option behind a listener, named in the one-line start-up error."""

    name: str
    value: str
    flag: str  # the command-line option an operator changes

    def problem(self, error: BaseException) -> str:
        """``discovery_port 4001: address already in use (...)``: option, cause, advice."""
        socket_error = error.socketError if isinstance(error, CannotListenError) else error
        code = getattr(socket_error, "errno", None)
        strerror = getattr(socket_error, "strerror", None)
        cause = (strerror or str(socket_error) or type(error).__name__).lower()
        advice = {
            errno.EADDRINUSE: f"another node on this host? give each node its own {self.flag}",
            errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
            errno.EADDRNOTAVAIL: "is the interface an address of this host?",
        }.get(code or 0)
        return f"{self.name} {self.value}: {cause}" + (f" ({advice})" if advice else "")


class ListeningPort(Protocol):
    """What :class:`HttpListener` uses of an ``IListeningPort``."""

    def getHost(self) -> Any: ...

    def stopListening(self) -> defer.Deferred[None] | None: ...


class ServerEndpoint(Protocol):
    """What :class:`HttpListener` uses of an ``IStreamServerEndpoint``."""

    def listen(self, factory: Any) -> defer.Deferred[Any]: ...


class HttpListener(service.Service):
    """The HTTP/WebSocket listener. It binds in ``privilegedStartService``, which twistd
    runs for every service before starting any, so a taken port stops start-up while
    nothing else runs."""

    def __init__(self, endpoint: ServerEndpoint, factory: Site,
                 scheme: str, fallback_host: str) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._scheme = scheme
        self._fallback_host = fallback_host
        self.port: ListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is not None:
            return
        outcome: list[Any] = []
        self._endpoint.listen(self._factory).addBoth(outcome.append)
        if not outcome:
            raise OSError(0, "the endpoint does not bind synchronously")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]

    def url(self) -> str:
        """``http://HOST:PORT/`` of the bound port; a wildcard becomes the host's address."""
        assert self.port is not None
        address: Any = self.port.getHost()
        host = getattr(address, "host", None)
        if host is None:
            return f"unix:{getattr(address, 'name', '?')}"
        if host in ("", "0.0.0.0", "::"):
            host = self._fallback_host
        if ":" in host:
            host = f"[{host}]"
        return f"{self._scheme}://{host}:{address.port}/"

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        stopped: defer.Deferred[Any] = defer.maybeDeferred(port.stopListening)
        return stopped.addCallback(lambda _: None)


class NodeService(service.MultiService):
    """The whole node; holds the state-dir lock for as long as it runs.

    Listeners bind first (``privilegedStartService``); if one cannot, the process logs
    one line and exits before any other service starts. Children stop one after another
    in reverse start order (MultiService stops them all at once): the executor must
    finish recording its cancelled tasks before the store closes under it.
    """

    def __init__(self, lock: StateDirLock, node_id: str, state_dir: Path) -> None:
        super().__init__()
        self._lock = lock
        self._node_id = node_id
        self._state_dir = state_dir
        self._bind_options: dict[service.Service, BindOption] = {}
        self._api: HttpListener | None = None

    def add_listener(self, child: service.Service, option: BindOption) -> None:
        """Add a child that binds a port; its bind errors name ``option``."""
        child.setServiceParent(self)
        self._bind_options[child] = option
        if isinstance(child, HttpListener):
            self._api = child

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        for child in self:
            try:
                child.privilegedStartService()
            except Exception as error:
                option = self._bind_options.get(child)
                if option is None:
                    raise
                self._refuse_to_start(option.problem(error))

    def _refuse_to_start(self, problem: str) -> NoReturn:
        """One line, then out of twistd before the reactor runs: the process exits with
        status 1. Only sockets are open yet and the exit closes them (closing a port by
        hand needs a reactor turn, and the reactor never runs)."""
        self._lock.release()
        log.critical("oxide-cluster: cannot start: {problem}", problem=problem)
        raise StartupRefused(problem)

    def startService(self) -> None:
        if self._api is not None:
            url = self._api.url()
            dashboard = url + "ui/" if url.endswith("/") else url
            log.info("oxide-cluster node {node_id} at {url} (dashboard: {dashboard}); "
                     "state in {state_dir}", node_id=self._node_id, url=url,
                     dashboard=dashboard, state_dir=self._state_dir)
        # After twistd dropped privileges (a uid change resets the dumpable flag).
        protected = protect_agent()
        log.info("agent protected from its tasks: non-dumpable {non_dumpable}, "
                 "oom_score_adj {oom_score_adj} (tasks {task_oom_score_adj})", **protected)
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        return defer.Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        try:
            for child in reversed(list(self)):
                try:
                    await defer.maybeDeferred(child.stopService)
                except Exception:
                    log.failure("stopping {child} failed", child=child)
        finally:
            self._lock.release()


def build_node(config: Config, reactor: Any) -> tuple[NodeService, Node]:
    """Create every service of the node, in start order, without starting any."""
    prepare_state_dir(config.state_dir)
    lock = StateDirLock(config.state_dir)
    lock.acquire()
    node_id = load_node_id(config.state_dir)
    secret = resolve_secret(config)
    top = NodeService(lock, node_id, config.state_dir)

    store = Store(reactor, config.state_dir / "oxide.sqlite3")
    store.setServiceParent(top)
    chosen = providers.select(config)
    try:
        state = chosen.cluster_state(reactor, config, node_id)  # None: this node's store
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"bad value for 'redis': {error}") from None
    if state is not None and state.service is not None:
        # Right after the store: connected before anything uses it, closed after all.
        state.service.setServiceParent(top)
    sampler = StatsSampler(config.sample_interval, reactor)
    sampler.setServiceParent(top)
    blobs = BlobStore(reactor, config.state_dir / "cas", config.workspace_cache)
    blobs.setServiceParent(top)
    runner = chosen.build("runner", reactor, config, node_id)
    log.info("tasks run in {isolation}", isolation=describe_isolation(runner.cgroups))
    run_as: User | None = getattr(runner, "run_as", None)  # the process runner's
    # Every collaborator goes to its constructor, so objects are made in dependency
    # order; the tree's start order is set by the setServiceParent calls alone. The
    # membership table comes first: peers, blobs from peers, labels, placement and the
    # node read it, and discovery (made after the node, whose announcement it sends)
    # keeps it current.
    settings = membership = peers = None
    if config.discovery:
        settings = discovery_settings(config)
        membership = new_membership(reactor, settings)
        peers = PeerClient(reactor, secret, membership, timeout=config.peer_timeout)
    workspaces = Workspaces(reactor, blobs, config.state_dir,
                            artifact_limit=config.artifact_limit,
                            keep_failed=config.keep_failed_workspaces,
                            source=_peer_blobs(peers, membership),
                            git_cache=config.git_cache, git_cache_age=config.git_cache_age,
                            run_as=run_as,
                            task_dir=Path(config.task_dir) if config.task_dir else None)
    workspaces.setServiceParent(top)
    retention = Retention(reactor, store, keep_tasks=config.keep_tasks,
                          store_limit=_store_limit(config), forget=workspaces.forget)
    retention.setServiceParent(top)
    executor = Executor(
        reactor, store, node_id,
        max_tasks=config.max_tasks, kill_grace=config.kill_grace,
        output_limit=config.output_limit, default_timeout=config.default_timeout,
        load=sampler.cpu_and_memory, max_cpu_percent=config.max_cpu_percent,
        max_memory_percent=config.max_memory_percent, workspaces=workspaces,
        cgroups=runner.cgroups, spawn=runner.spawn, signal_group=runner.signal,
        default_resources=config.default_resources,
        allocatable=host_allocatable(config.reserve), sample_usage=True,
    )
    try:
        elector: Any = chosen.build("election", reactor, config, node_id)
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"bad value for 'redis': {error}") from None
    node = Node(config=config, node_id=node_id, secret=secret, store=store,
                executor=executor, sampler=sampler, elector=elector, reactor=reactor,
                started_at=reactor.seconds(), retention=retention,
                drain=Drain(config.drain, reactor.seconds() if config.drain else None),
                membership=membership, api_port=_port_of(config.listen),
                ip_address=_interface_of(config.listen) or primary_ipv4())
    labels = LabelBook(config.labels, partial(_peer_labels, membership),
                       local_allocatable=executor.allocatable,
                       rooms=partial(_peer_rooms, membership))
    scheduler = Scheduler(reactor, store, executor, default_queue_timeout=config.queue_timeout,
                          labels=labels, pins=workspaces, drain=node.drain,
                          default_resources=config.default_resources)
    _RecoverThenRun(store, executor, scheduler, lambda code: exit_after_stop(reactor, code),
                    config.state_dir).setServiceParent(top)
    scheduler.setServiceParent(top)
    elector.setServiceParent(top)
    discovery = placement = None
    if settings is not None and membership is not None and peers is not None:
        transport = chosen.build("discovery_transport", reactor, config, node_id,
                                 local_node=node.announcement)
        discovery = DiscoveryService(reactor, settings, node.announcement, store, secret,
                                     transport=transport, membership=membership)
        top.add_listener(discovery, BindOption("discovery_port", str(config.discovery_port),
                                               "--discovery-port"))
        membership.subscribe(labels.membership_event)
        # After discovery: stops (closing its idle connections) before discovery does,
        # after the API and the drain, which may still ask peers.
        peers.setServiceParent(top)
        placement = Placement(reactor, node)
    directory = None
    cluster = None
    suites: SuiteDurations = StoreSuiteDurations(store)
    if state is not None:
        suites = state.suites
        directory = state.directory
        # The executor's state listeners are its subscription list (the scheduler, the
        # hub and the metrics subscribe too): the directory records every change.
        executor.state_listeners.append(directory.task_changed)
        cluster = _cluster_queue(reactor, config, node, scheduler, state.queue, peers,
                                 placement)
        cluster.dispatcher.setServiceParent(top)
        cluster.watch.setServiceParent(top)
    router = TaskRouter(
        RouterSettings(node_id, config.labels, config.max_timeout, config.queue_timeout,
                       config.peer_timeout),
        reactor, elector, scheduler, executor, peers=peers, placement=placement,
        directory=directory, cluster=cluster, membership=membership)
    hub = LiveHub(executor, store, peers=peers, node_id=node_id, reactor=reactor,
                  locate=router.locate_owner if cluster is not None else None)
    hub.setServiceParent(top)
    elector.subscribe(lambda _: hub.publish({"type": "leader", **node.leader()}))
    if membership is not None:
        membership.subscribe(hub.publish)
    api = TaskApi(node, router, websocket=LiveFactory(hub, secret, reactor).web_resource(),
                  workspaces=workspaces, suites=suites, discovery=discovery,
                  websocket_hub=hub)
    if directory is not None and membership is not None:
        recovery = Recovery(reactor, node, directory, router, hub.publish)
        membership.subscribe(recovery.membership_event)
        elector.subscribe(recovery.leader_changed)
    site = MeteredSite(api.resource(), api.metrics, access_log=config.access_log,
                       requestFactory=partial(UploadRequest, sinks=api.batch_sink))
    try:
        endpoint = endpoints.serverFromString(reactor, config.listen)
    except (ValueError, OSError) as error:  # syntax, or a TLS key file that is missing
        raise ConfigError(f"bad value for 'listen': {error}") from None
    scheme = "https" if config.listen.startswith("ssl:") else "http"
    listener = HttpListener(endpoint, site, scheme, node.ip_address or node.hostname)
    top.add_listener(listener, BindOption("listen", config.listen, "--listen port"))
    # Last, so it stops first: the API keeps answering while running tasks finish.
    DrainOnStop(reactor, config.stop_grace, scheduler.drain,
                lambda: executor.running_count, executor.when_idle).setServiceParent(top)
    return top, node


STORE_LIMIT_FRACTION = 0.1


def _store_limit(config: Config) -> int:
    """``store_limit``, or a tenth of the filesystem that holds the state dir."""
    if config.store_limit is not None:
        return config.store_limit
    return int(shutil.disk_usage(config.state_dir).total * STORE_LIMIT_FRACTION)


def _cluster_queue(reactor: Any, config: Config, node: Node, scheduler: Scheduler,
                   backend: QueueBackend, peers: PeerClient | None,
                   placement: Placement | None) -> ClusterQueue:
    """The cluster queue (``cluster_queue.py``): records in the election backend's
    durable store, the leader's dispatch loop, exactly-once admission on every node."""
    elector = node.elector
    admission = ClusterAdmission(
        node.node_id, backend, scheduler,
        parse=lambda fields: parse_task_request(fields, config.max_timeout),
        peers=peers, token=lambda: elector.token, observe_token=elector.observe_token,
        labels=config.labels, peer_timeout=config.peer_timeout)

    def candidates() -> list[Candidate]:
        if placement is not None:
            return placement.candidates()
        stats = node.stats()
        return [Candidate(node.node_id, stats["free_slots"], stats["cpu_percent"],
                          stats["memory_percent"], config.labels, node.drain.draining,
                          Capacity.from_stats(stats))]

    dispatcher = ClusterDispatcher(
        reactor, backend, is_leader=lambda: bool(elector.is_leader), candidates=candidates,
        send=admission.send,
        placed=placement.placed if placement is not None else (lambda node_id, _: None),
        term=lambda: elector.token if elector.is_leader else None,
        default_queue_timeout=config.queue_timeout)

    def known() -> list[str]:
        membership = node.membership
        if membership is None:
            return []
        return sorted({peer.node_id for peer in membership.peers()}
                      | {rumour.node_id for rumour in membership.rumours()})

    class Lost:
        """A task the cluster queue lost, ended ``lost`` in this node's store."""

        def ended_lost(self, record: Mapping[str, Any], reason: str) -> defer.Deferred[None]:
            request = parse_task_request(dict(record["request"]), config.max_timeout)
            task = node.executor.new_task(request, task_id=str(record["id"]))
            task.created_at = float(record.get("created_at") or task.created_at)
            task.state, task.reason = TaskState.LOST, reason
            task.finished_at = reactor.seconds()
            return node.store.put_task(task)

    locator = PeerLocator(node.node_id, scheduler.find, peers, known)
    watch = AdmittedWatch(reactor, backend, locator, Lost(), wake=dispatcher.wake,
                          default_queue_timeout=config.queue_timeout)

    def slot_freed(task: Task) -> None:
        if task.state.terminal:
            dispatcher.wake()
    node.executor.state_listeners.append(slot_freed)
    return ClusterQueue(backend, admission, dispatcher, watch, locator)


def _peer_blobs(peers: PeerClient | None, membership: Membership | None) -> PeerBlobs | None:
    """Where a workspace's missing blobs come from: the healthy peers, if discovery is on."""
    if peers is None or membership is None:
        return None
    return PeerBlobs(peers, lambda: [peer.node_id for peer in membership.healthy()])


def _peer_labels(membership: Membership | None) -> list[dict[str, str]]:
    """Labels of every peer membership knows, healthy or not (the 422 check)."""
    if membership is None:
        return []
    return [peer.labels for peer in membership]


def _peer_rooms(membership: Membership | None) -> list[Room]:
    """Labels and announced allocatable of every peer membership knows (the 422 check)."""
    if membership is None:
        return []
    rooms: list[Room] = []
    for peer in membership:
        capacity = Capacity.from_stats(peer.stats)
        rooms.append((peer.labels, capacity.allocatable if capacity is not None else None))
    return rooms


def discovery_settings(config: Config) -> DiscoverySettings:
    """Map the node's config keys onto discovery settings (suspect at 40 % of dead)."""
    return DiscoverySettings(
        port=config.discovery_port,
        interfaces=config.discovery_interface,
        peers=config.peers,
        announce_interval=config.announce_interval,
        suspect_after=max(2 * config.announce_interval, 0.4 * config.dead_after),
        dead_after=config.dead_after,
    )


def _port_of(description: str) -> int:
    """The port number named in an endpoint string like ``tcp:4000:interface=...``."""
    for part in description.split(":")[1:]:
        key, sep, value = part.partition("=")
        if sep and key == "port" and value.isdigit():
            return int(value)
        if not sep and part.isdigit():
            return int(part)
    return 0


def _interface_of(description: str) -> str | None:
    """The ``interface=`` address of an endpoint string, unless it is a wildcard."""
    for part in description.split(":")[1:]:
        key, sep, value = part.partition("=")
        if sep and key == "interface" and value not in ("", "0.0.0.0", "::"):
            return value
    return None


def exit_after_stop(reactor: Any, code: int) -> None:
    """Stop the reactor (every service stops, ports close), then exit with ``code``.

    twistd exits 0 whenever its reactor stops; the status is set at interpreter exit,
    after twistd has removed its pidfile and the log is written.
    """
    atexit.register(_exit_now, code)
    reactor.stop()


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(code)


class _RecoverThenRun(service.Service):
    """Starts the executor only after the store is open and earlier tasks are settled."""

    def __init__(self, store: Store, executor: Executor, scheduler: Scheduler,
                 stop: Callable[[int], None], state_dir: Path) -> None:
        self._store = store
        self._executor = executor
        self._scheduler = scheduler
        self._stop = stop
        self._state_dir = state_dir

    def startService(self) -> None:
        super().startService()
        self._executor.startService()
        self._store.opened.addCallback(
            lambda _: defer.Deferred.fromCoroutine(self._recover())
        ).addErrback(self._fatal)

    async def _recover(self) -> None:
        await self._executor.recover()
        await self._scheduler.recover()  # queued tasks wait again, in their order

    def _fatal(self, failure: Failure) -> None:
        if failure.check(StoreError):  # its message names the file and the cause
            log.critical("oxide-cluster: cannot start: state_dir {state_dir}: {problem}",
                         state_dir=self._state_dir, problem=failure.getErrorMessage())
        else:
            log.failure("recovering earlier tasks failed; stopping", failure)
        self._stop(1)

    def stopService(self) -> Any:
        super().stopService()
        return self._executor.stopService()


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    config: Config = options.config
    sys.excepthook = _quiet_refusals(sys.excepthook)
    try:
        top, _node = build_node(config, reactor)
    except ConfigError as error:
        sys.stderr.write(f"oxide-cluster: {error}\n")
        raise SystemExit(2) from None
    return top


__all__ = ["HttpListener", "NodeService", "StartupRefused", "Options", "build_node", "check_usable",
           "makeService"]

"""``twistd oxide-cluster``: command-line options and the node's service tree."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python import usage

from oxide_cluster import config as config_module
from oxide_cluster import logs
from oxide_cluster.api import TaskApi
from oxide_cluster.config import Config, ConfigError
from oxide_cluster.directory import TaskDirectory
from oxide_cluster.discovery import DiscoveryService, DiscoverySettings
from oxide_cluster.election import (
    RedisAddress,
    RedisLockBackend,
    StandaloneElector,
    redis_elector,
)
from oxide_cluster.executor import Executor
from oxide_cluster.forwarding import PeerClient
from oxide_cluster.identity import (
    StateDirLock,
    load_node_id,
    prepare_state_dir,
    resolve_secret,
)
from oxide_cluster.metrics import MeteredSite
from oxide_cluster.node import Node
from oxide_cluster.placement import Placement
from oxide_cluster.recovery import Recovery
from oxide_cluster.scheduler import LabelBook, Scheduler
from oxide_cluster.stats import StatsSampler
from oxide_cluster.store import Store
from oxide_cluster.ws import LiveFactory, LiveHub

log = Logger()


def _option_table() -> tuple[list[list[Any]], list[list[Any]]]:
    parameters, flags = [], []
    for setting in config_module.SETTINGS:
        default = setting.default
        shown = f" [default: {default!r}]" if default not in (None, (), {}) else ""
        help_text = f"{setting.help} (env {setting.env_name}){shown}"
        if setting.parse is config_module._flag:
            flags.append([f"no-{setting.option}", None, f"turn off: {help_text}"])
        else:
            parameters.append([setting.option, None, None, help_text])
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
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None
        logs.use_config(getattr(self, "parent", None), self.config.log_format)


class NodeService(service.MultiService):
    """The whole node; holds the state-dir lock for as long as it runs.

    Children stop one after another in reverse start order (MultiService stops them all
    at once): the executor must finish recording its cancelled tasks before the store
    closes under it.
    """

    def __init__(self, lock: StateDirLock) -> None:
        super().__init__()
        self._lock = lock

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
    top = NodeService(lock)

    store = Store(reactor, config.state_dir / "oxide.sqlite3")
    store.setServiceParent(top)
    sampler = StatsSampler(config.sample_interval, reactor)
    sampler.setServiceParent(top)
    executor = Executor(
        reactor, store, node_id,
        max_tasks=config.max_tasks, kill_grace=config.kill_grace,
        output_limit=config.output_limit, default_timeout=config.default_timeout,
        load=sampler.cpu_and_memory, max_cpu_percent=config.max_cpu_percent,
        max_memory_percent=config.max_memory_percent,
    )
    elector: Any = StandaloneElector(reactor, node_id)
    if config.redis:
        try:
            elector = redis_elector(reactor, node_id, config.redis, config.cluster_name,
                                    config.leader_ttl)
        except ValueError as error:
            raise ConfigError(f"bad value for 'redis': {error}") from None
    node = Node(config=config, node_id=node_id, secret=secret, store=store,
                executor=executor, sampler=sampler, elector=elector, reactor=reactor,
                started_at=reactor.seconds())
    labels = LabelBook(config.labels, lambda: _peer_labels(node))
    scheduler = Scheduler(reactor, store, executor, default_queue_timeout=config.queue_timeout,
                          labels=labels)
    _RecoverThenRun(store, executor, scheduler).setServiceParent(top)
    scheduler.setServiceParent(top)
    elector.setServiceParent(top)
    if config.discovery:
        node.discovery = DiscoveryService(reactor, discovery_settings(config),
                                          node.announcement, store, secret)
        node.discovery.setServiceParent(top)
        node.discovery.membership.subscribe(labels.membership_event)

    hub = LiveHub(executor, store)
    hub.setServiceParent(top)
    node.ws = hub
    elector.subscribe(lambda _: hub.publish({"type": "leader", **node.leader()}))
    if node.discovery is not None:
        node.discovery.membership.subscribe(hub.publish)
    peers = placement = None
    if node.discovery is not None:
        peers = PeerClient(reactor, secret, node.discovery)
        placement = Placement(reactor, node)
        reactor.addSystemEventTrigger("before", "shutdown", peers.close)
        hub.peers, hub.node_id, hub.reactor = peers, node_id, reactor
    directory = None
    if config.redis:
        directory = TaskDirectory(RedisLockBackend(reactor, RedisAddress.parse(config.redis)),
                                  config.cluster_name)
        executor.state_listeners.append(directory.task_changed)
        reactor.callWhenRunning(directory.connect)
        reactor.addSystemEventTrigger("after", "shutdown", directory.close)
    api = TaskApi(node, websocket=LiveFactory(hub, secret, reactor).web_resource(),
                  peers=peers, placement=placement, directory=directory, scheduler=scheduler)
    if directory is not None and node.discovery is not None:
        recovery = Recovery(reactor, node, directory, api.place_retry, hub.publish)
        node.discovery.membership.subscribe(recovery.membership_event)
        elector.subscribe(recovery.leader_changed)
    site = MeteredSite(api.resource(), api.metrics, access_log=config.access_log)
    site.displayTracebacks = False
    endpoint = endpoints.serverFromString(reactor, config.listen)
    listener = StreamServerEndpointService(endpoint, site)
    listener._raiseSynchronously = True
    listener.setServiceParent(top)
    node.api_port = _port_of(config.listen)
    node.ip_address = _interface_of(config.listen) or node.ip_address
    return top, node


def _peer_labels(node: Node) -> list[dict[str, str]]:
    """Labels of every peer membership knows, healthy or not (the 422 check)."""
    if node.discovery is None:
        return []
    return [peer.labels for peer in node.discovery.membership]


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


class _RecoverThenRun(service.Service):
    """Starts the executor only after the store is open and earlier tasks are settled."""

    def __init__(self, store: Store, executor: Executor, scheduler: Scheduler) -> None:
        self._store = store
        self._executor = executor
        self._scheduler = scheduler

    def startService(self) -> None:
        super().startService()
        self._executor.startService()
        self._store.opened.addCallback(
            lambda _: defer.Deferred.fromCoroutine(self._recover())
        ).addErrback(self._fatal)

    async def _recover(self) -> None:
        await self._executor.recover()
        await self._scheduler.recover()  # queued tasks wait again, in their order

    def _fatal(self, failure: Any) -> None:
        log.failure("cannot open the store; stopping", failure)
        from twisted.internet import reactor

        stoppable: Any = reactor
        stoppable.stop()

    def stopService(self) -> Any:
        super().stopService()
        return self._executor.stopService()


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    config: Config = options.config
    try:
        top, node = build_node(config, reactor)
    except ConfigError as error:
        sys.stderr.write(f"oxide-cluster: {error}\n")
        raise SystemExit(2) from None
    log.info("oxide-cluster node {node_id} listening on {listen}, state in {state_dir}",
             node_id=node.node_id, listen=config.listen, state_dir=config.state_dir)
    return top


__all__ = ["Options", "build_node", "makeService"]

"""Providers chosen by name: the built-in ones and those ``twisted.plugin`` finds.

A third-party package ships ``twisted/plugins/<name>.py`` declaring a :class:`Provider`
(it provides ``IPlugin`` and ``IOxideProvider``); :func:`installed` finds it with
``getPlugins`` and :func:`select` picks one per kind from the configuration, parsing
each chosen provider's own options from ``provider_options`` like every other key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins
from zope.interface import implementer

from oxide_cluster.config import Config, ConfigError, Setting
from oxide_cluster.interfaces import ClusterState, IClusterStateSource, IOxideProvider

log = Logger()

KINDS = ("discovery_transport", "election", "runner")


@attrs.frozen
class ProviderContext:
    """What a factory gets: the reactor, the node's config and id, its parsed options, and
    (for discovery transports) what the node announces, for one that also speaks to
    foreign systems (``codara``)."""

    reactor: Any
    config: Config
    node_id: str
    options: Mapping[str, Any] = attrs.field(factory=dict)
    local_node: Callable[[], Mapping[str, Any]] | None = None


def no_cluster_state(context: ProviderContext) -> ClusterState | None:
    """No durable cluster state: tasks queue in the node's own SQLite store."""
    return None


@implementer(IPlugin, IOxideProvider, IClusterStateSource)
@attrs.frozen
class Provider:
    """One named provider of one kind; declare it in ``twisted/plugins/<name>.py``.

    ``cluster_state`` (election providers only) gives the queue's durable store.
    """

    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    name: str
    factory: Callable[[ProviderContext], Any]
    description: str = ""
    options: tuple[Setting, ...] = ()
    cluster_state: Callable[[ProviderContext], ClusterState | None] = no_cluster_state


def _udp(broadcast: bool) -> Callable[[ProviderContext], Any]:
    def build(context: ProviderContext) -> Any:
        from oxide_cluster.discovery import UdpTransport

        config = context.config
        return UdpTransport(context.reactor, config.discovery_port,
                            interfaces=config.discovery_interface, broadcast=broadcast)
    return build


def _multicast(context: ProviderContext) -> Any:
    from oxide_cluster.discovery import MulticastTransport, parse_multicast_group

    config = context.config
    return MulticastTransport(context.reactor, config.discovery_port,
                              parse_multicast_group(config.multicast_group),
                              ttl=config.multicast_ttl,
                              interface=config.multicast_interface or "")


def _peer(value: Any) -> str | None:
    """``host[:port]`` (checked now; the default port is the discovery port)."""
    from oxide_cluster.discovery import parse_peer

    if value is None or str(value).strip() == "":
        return None
    parse_peer(str(value), 1)
    return str(value).strip()


def _codara(context: ProviderContext) -> Any:
    from oxide_cluster.codara import CodaraTransport
    from oxide_cluster.discovery import UdpTransport, parse_peer

    config = context.config
    if context.local_node is None:
        raise ConfigError("discovery_transport 'codara' needs the node's announcement")
    server = context.options.get("codara_server")
    return CodaraTransport(
        context.reactor,
        UdpTransport(context.reactor, config.discovery_port,
                     interfaces=config.discovery_interface, broadcast=True),
        context.local_node,
        parse_peer(server, config.discovery_port) if server else None)


def _standalone(context: ProviderContext) -> Any:
    from oxide_cluster.election import StandaloneElector

    return StandaloneElector(context.reactor, context.node_id)


def _redis(context: ProviderContext) -> Any:
    from oxide_cluster.election import redis_elector

    config = context.config
    if not config.redis:
        raise ConfigError("election 'redis' needs a Redis URL ('redis', --redis)")
    return redis_elector(context.reactor, context.node_id, config.redis,
                         config.cluster_name, config.leader_ttl)


# The queue's and directory's Redis connection: a command timeout drops the connection
# and fails every command in flight on it (each a 503 queue_unavailable), so it is longer
# than the election's 1 s lease-sized one: on a loaded machine (10,000 submits at once on
# 2 shared cores) replies waited past 1 s in the reactor and whole bursts failed.
QUEUE_REDIS_TIMEOUT = 5.0


def _redis_state(context: ProviderContext) -> ClusterState:
    """The queue, task directory and suite durations in Redis, on one connection of
    their own (the elector's has a lease-sized timeout); the connection is the state's
    service, which ``tap.py`` puts in the service tree."""
    from oxide_cluster.cluster_queue import RedisQueueBackend
    from oxide_cluster.directory import TaskDirectory
    from oxide_cluster.redis_connection import RedisAddress, RedisConnection
    from oxide_cluster.suites import RedisSuiteDurations

    config = context.config
    if not config.redis:
        raise ConfigError("election 'redis' needs a Redis URL ('redis', --redis)")
    redis = RedisConnection(context.reactor, RedisAddress.parse(config.redis),
                            timeout=QUEUE_REDIS_TIMEOUT)
    return ClusterState(queue=RedisQueueBackend(redis, config.cluster_name),
                        directory=TaskDirectory(redis, config.cluster_name),
                        suites=RedisSuiteDurations(redis, config.cluster_name),
                        service=redis)


def _process(context: ProviderContext) -> Any:
    from oxide_cluster.cgroups import CgroupUnavailable, detect
    from oxide_cluster.executor import ProcessRunner

    config = context.config
    try:
        cgroups = detect(config.cgroups, context.node_id, cgroup_root=config.cgroup_root)
    except CgroupUnavailable as error:
        raise ConfigError(f"bad value for 'cgroups': {config.cgroups}: {error}") from None
    from oxide_cluster.protection import resolve_user

    try:
        run_as = resolve_user(config.run_as)
    except ValueError as error:
        raise ConfigError(f"bad value for 'run_as': {error}") from None
    return ProcessRunner(cgroups, run_as=run_as)


BUILTIN: tuple[Provider, ...] = (
    Provider("discovery_transport", "broadcast", _udp(True),
             "UDP broadcast on every IPv4 interface, plus the static 'peers'"),
    Provider("discovery_transport", "peers", _udp(False),
             "UDP unicast to the static/DNS 'peers' only (no broadcast), plus gossip"),
    Provider("discovery_transport", "multicast", _multicast,
             "UDP to an IPv4 multicast group (multicast_group, multicast_ttl)"),
    Provider("discovery_transport", "codara", _codara,
             "broadcast, plus the Codara agent's unauthenticated cluster_announce and "
             "cluster_stats datagrams (opt-in)",
             options=(Setting("codara_server", _peer, None,
                              "a Codara main server host[:port] that also gets them by "
                              "unicast (default: broadcast only)"),)),
    Provider("election", "standalone", _standalone, "this node always leads (token 1)"),
    Provider("election", "redis", _redis, "a Redis lease with fencing tokens ('redis'); "
             "the cluster queue in Redis", cluster_state=_redis_state),
    Provider("runner", "process", _process,
             "a process group per task, in a cgroup per the 'cgroups' key"),
)


def installed(plugins: Iterable[Any] | None = None) -> list[Any]:
    """Built-in providers, then every ``IOxideProvider`` plugin (a built-in name wins)."""
    found: list[Any] = list(BUILTIN)
    taken = {(p.kind, p.name) for p in BUILTIN}
    if plugins is None:
        plugins = _plugins()
    for plugin in plugins:
        key = (str(getattr(plugin, "kind", "")), str(getattr(plugin, "name", "")))
        if key[0] not in KINDS or not key[1]:
            log.warn("ignoring provider plugin {plugin!r}: bad kind or name", plugin=plugin)
        elif key in taken:
            log.warn("ignoring provider plugin {kind} {name}: the name is taken",
                     kind=key[0], name=key[1])
        else:
            taken.add(key)
            found.append(plugin)
    return found


def _plugins() -> list[Any]:
    import twisted.plugins

    try:
        return list(getPlugins(IOxideProvider, twisted.plugins))
    except Exception:  # a broken third-party module must not take the node down
        log.failure("scanning twisted.plugins for providers failed")
        return []


def names(found: Iterable[Any], kind: str) -> list[str]:
    return sorted(p.name for p in found if p.kind == kind)


def chosen_names(config: Config) -> dict[str, str]:
    """The provider name per kind; ``--redis`` alone still means Redis election."""
    election = config.election or ("redis" if config.redis else "standalone")
    return {"discovery_transport": config.discovery_transport, "election": election,
            "runner": config.runner}


@attrs.frozen
class Selection:
    """The chosen provider of each kind, with its parsed options."""

    providers: Mapping[str, Any]
    options: Mapping[str, Mapping[str, Any]]

    def build(self, kind: str, reactor: Any, config: Config, node_id: str,
              local_node: Callable[[], Mapping[str, Any]] | None = None) -> Any:
        context = ProviderContext(reactor, config, node_id, self.options[kind], local_node)
        return self.providers[kind].factory(context)

    def cluster_state(self, reactor: Any, config: Config, node_id: str) -> ClusterState | None:
        """The election provider's durable cluster state, or None (none, or a plugin
        that does not offer :class:`IClusterStateSource`)."""
        source = getattr(self.providers["election"], "cluster_state", None)
        if source is None:
            return None
        state: ClusterState | None = source(
            ProviderContext(reactor, config, node_id, self.options["election"]))
        return state


def select(config: Config, found: Iterable[Any] | None = None) -> Selection:
    """Pick the configured provider of each kind; unknown names and options are a
    :class:`ConfigError` of one line naming what is installed."""
    found = installed() if found is None else list(found)
    providers: dict[str, Any] = {}
    for kind, name in chosen_names(config).items():
        matching = [p for p in found if p.kind == kind and p.name == name]
        if not matching:
            raise ConfigError(f"unknown {kind} {name!r} (installed: "
                              f"{', '.join(names(found, kind))})")
        providers[kind] = matching[0]
    if providers["election"].name == "redis" and not config.redis:
        raise ConfigError("election 'redis' needs a Redis URL ('redis', --redis)")
    if providers["election"].name == "standalone" and config.redis:
        # Every node would lead the Redis queue and dispatch the same tasks.
        raise ConfigError("election 'standalone' cannot run with 'redis': the Redis "
                          "queue needs one leader (leave 'election' unset)")
    remaining = dict(config.provider_options)
    options: dict[str, dict[str, Any]] = {}
    for kind, provider in providers.items():
        parsed: dict[str, Any] = {}
        for setting in provider.options:
            raw = remaining.pop(setting.name, setting.default)
            try:
                parsed[setting.name] = setting.parse(raw) if raw is not None else None
            except (TypeError, ValueError) as error:
                raise ConfigError(f"bad value for provider option {setting.name!r} of "
                                  f"{kind} {provider.name!r}: {error}") from None
        options[kind] = parsed
    if remaining:
        known = sorted(s.name for p in providers.values() for s in p.options)
        raise ConfigError(f"unknown provider option(s) {', '.join(sorted(remaining))} "
                          f"(the chosen providers take: {', '.join(known) or 'none'})")
    return Selection(providers, options)


def describe(found: Iterable[Any] | None = None) -> str:
    """``discovery_transport: broadcast, codara, multicast, peers; election: ...`` for --help."""
    found = installed() if found is None else list(found)
    return "; ".join(f"{kind}: {', '.join(names(found, kind))}" for kind in KINDS)


__all__ = ["BUILTIN", "KINDS", "QUEUE_REDIS_TIMEOUT", "Provider", "ProviderContext",
           "Selection", "chosen_names", "describe", "installed", "no_cluster_state", "select"]

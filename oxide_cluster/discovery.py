"""UDP discovery: announce this node, learn peers, feed the membership table.

``DiscoveryProtocol`` only parses (through ``wire``) and hands over; ``DiscoveryService``
owns the socket, the targets (broadcast addresses, static/DNS peers and dynamic peers)
and the timers.

Gossip: every unicast announce (to a static or dynamic peer, and every answer to a
``query``) carries up to ``wire.MAX_MEMBERS`` of the peers this node hears, rotating
through them, as many as fit one datagram. A node named there that we do not hear
becomes a dynamic peer (a unicast target) at once; so does a node that announces to us
by unicast, so that it hears us directly too. Broadcast announces carry no members: the
segment hears everyone anyway, and they stay readable by version-1 nodes.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import psutil
from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet import defer, threads
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from oxide_cluster import wire
from oxide_cluster.clock import SecondsClock
from oxide_cluster.interfaces import DiscoveryTransport, IDiscoveryTransport
from oxide_cluster.membership import Membership, PeerState, PeerStore
from oxide_cluster.wire import Codec, Message, WireError

log = Logger()

Address = tuple[str, int]
Counters = dict[str, dict[str, int]]
Resolver = Callable[[str], "defer.Deferred[list[str]]"]


def _positive(_: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"discovery.{attribute.name} must be positive, got {value!r}")


def parse_peer(text: str, default_port: int) -> Address:
    """``host``, ``host:port`` -> ``(host, port)``; IPv4 or DNS names only."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host, port_text = text.strip(), str(default_port)
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"discovery peer {text!r} is not host[:port]")
    return host, int(port_text)


def _check_peers(_: Any, attribute: attrs.Attribute[tuple[str, ...]], value: Any) -> None:
    for peer in value:
        parse_peer(peer, 1)


# Defaults (the arithmetic behind them):
# - A crashed node must be declared dead within 3 s: dead_after 2.5 s of silence, checked
#   every announce_interval 0.25 s, gives at most 2.75 s after its last datagram.
# - With 20 % independent loss, 10 announces in a row must be lost to reach dead_after:
#   0.2**10 ~ 1.0e-7 per window. A live node over 60 s offers ~240 windows to each of ~9
#   observers: ~2e-4 that anyone wrongly declares it dead. Suspicion (1 s = 4 losses,
#   0.2**4 = 1.6e-3) also triggers a unicast ``query`` probe every tick; each probe
#   round trip fails with 1 - 0.8**2 = 0.36, and 6 probes before dead_after all fail
#   with ~2e-3, so the estimate falls to ~5e-7 per node-minute.
# - Cost: one ~600-byte datagram per node per 0.25 s, i.e. a 10-node LAN moves ~24 KB/s
#   per receiver; broadcast stays fine to a few hundred nodes (docs/architecture.rst,
#   "Discovery protocol").
# - replay_window 5 s tolerates modest clock skew between hosts (ts is wall time).
# - prune_after 300 s keeps dead peers visible to operators and the leader for a while.
def _as_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@attrs.frozen
class DiscoverySettings:
    """Discovery configuration (the core maps config keys onto these fields)."""

    port: int = attrs.field(default=4001, validator=attrs.validators.instance_of(int))
    bind: str = "0.0.0.0"
    #: Interface names (or literal IPv4 broadcast addresses); empty = every
    #: non-loopback IPv4 interface that has a broadcast address.
    interfaces: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple)
    #: Static unicast targets ``host[:port]``; names are re-resolved every resolve_interval.
    peers: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple, validator=_check_peers)
    #: False: no broadcast at all (overlay networks, tests); only ``peers`` are used.
    broadcast: bool = True
    announce_interval: float = attrs.field(default=0.25, validator=_positive)
    suspect_after: float = attrs.field(default=1.0, validator=_positive)
    dead_after: float = attrs.field(default=2.5, validator=_positive)
    prune_after: float = attrs.field(default=300.0, validator=_positive)
    replay_window: float = attrs.field(default=5.0, validator=_positive)
    resolve_interval: float = attrs.field(default=30.0, validator=_positive)
    save_interval: float = attrs.field(default=5.0, validator=_positive)
    enabled: bool = True

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"discovery.port must be in 0..65535, got {self.port}")
        if not self.suspect_after < self.dead_after <= self.prune_after:
            raise ValueError("discovery needs suspect_after < dead_after <= prune_after")
        if self.suspect_after < 2 * self.announce_interval:
            raise ValueError("discovery.suspect_after must cover at least two intervals")


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def broadcast_addresses(interfaces: tuple[str, ...] = ()) -> list[str]:
    """IPv4 broadcast addresses of the named interfaces (all non-loopback ones if none)."""
    found: list[str] = []
    literal = [name for name in interfaces if _is_ipv4(name)]
    names = [name for name in interfaces if not _is_ipv4(name)]
    if names or not interfaces:
        table = psutil.net_if_addrs()
        for name in names:
            if name not in table:
                log.warn("discovery interface {name} does not exist", name=name)
        for name, addresses in table.items():
            if names and name not in names:
                continue
            for address in addresses:
                if (
                    address.family == socket.AF_INET
                    and address.broadcast
                    and not address.address.startswith("127.")
                ):
                    found.append(address.broadcast)
    return sorted(set(found + literal))


def broadcast_networks(interfaces: tuple[str, ...] = ()) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks our broadcasts reach (same interfaces as ``broadcast_addresses``).

    Literal broadcast addresses carry no netmask and are left out: a peer behind one is
    then also announced to by unicast, which costs traffic but never reachability.
    """
    names = [name for name in interfaces if not _is_ipv4(name)]
    if interfaces and not names:
        return []
    found: set[ipaddress.IPv4Network] = set()
    for name, addresses in psutil.net_if_addrs().items():
        if names and name not in names:
            continue
        for address in addresses:
            if (address.family == socket.AF_INET and address.broadcast and address.netmask
                    and not address.address.startswith("127.")):
                found.add(ipaddress.IPv4Network(f"{address.address}/{address.netmask}",
                                                strict=False))
    return sorted(found)


def _getaddrinfo_v4(host: str) -> list[str]:
    infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)
    return sorted({str(info[4][0]) for info in infos})


def new_counters() -> Counters:
    """Every counter present from the start, so /metrics shows zeros, not gaps."""
    return {
        "received": dict.fromkeys(wire.TYPES, 0),
        "sent": dict.fromkeys(wire.TYPES, 0),
        "dropped": dict.fromkeys(wire.REASONS, 0),
        "ignored": {"own": 0},
        "gossip": {"learned": 0, "dropped": 0},
        "errors": {"send": 0, "encode": 0, "handler": 0},
    }


@attrs.define
class _RateLimit:
    """At most one log line per key per ``every`` seconds, with the count suppressed."""

    clock: SecondsClock
    every: float = 10.0
    _last: dict[str, float] = attrs.field(factory=dict, init=False)
    _suppressed: dict[str, int] = attrs.field(factory=dict, init=False)

    def allow(self, key: str) -> int | None:
        """Return how many were suppressed if this one may be logged, else None."""
        now = self.clock.seconds()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


class DiscoveryProtocol(DatagramProtocol):
    """Decode, count drops, hand valid messages over; never raises to the reactor."""

    def __init__(
        self,
        codec: Codec,
        deliver: Callable[[Message, Address], None],
        counters: Counters,
        clock: SecondsClock,
    ) -> None:
        self.codec = codec
        self.deliver = deliver
        self.counters = counters
        self._limit = _RateLimit(clock)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            message = self.codec.decode(datagram)
        except WireError as e:
            self.counters["dropped"][e.reason] += 1
            suppressed = self._limit.allow(e.reason)
            if suppressed is not None:
                log.warn(
                    "dropped discovery datagram from {addr}: {reason} ({detail});"
                    " {suppressed} more {reason} drops not logged",
                    addr=addr,
                    reason=e.reason,
                    detail=e.detail,
                    suppressed=suppressed,
                )
            return
        except Exception:
            self.counters["errors"]["handler"] += 1
            log.failure("decoding a discovery datagram from {addr} failed", addr=addr)
            return
        try:
            self.deliver(message, (str(addr[0]), int(addr[1])))
        except Exception:
            self.counters["errors"]["handler"] += 1
            log.failure("handling a discovery {type} from {addr} failed",
                        type=message.type, addr=addr)


def _never_raise(what: str, func: Callable[[], None]) -> Callable[[], None]:
    """TimerService stops for good when its callable raises: log instead."""

    def call() -> None:
        try:
            func()
        except Exception:
            log.failure("discovery {what} failed", what=what)

    return call


Deliver = Callable[[bytes, Address], None]


class _Receiver(DatagramProtocol):
    """Hands every datagram of a UDP port to the service's ``deliver``."""

    def __init__(self, deliver: Deliver) -> None:
        self.deliver = deliver

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.deliver(datagram, addr)


@implementer(IDiscoveryTransport)
class UdpTransport:
    """The ``broadcast`` and ``peers`` transports: one UDP socket; with ``broadcast``, the
    cluster is every IPv4 broadcast address of ``interfaces`` (all if empty)."""

    def __init__(self, reactor: Any, port: int, *, bind: str = "0.0.0.0",
                 interfaces: tuple[str, ...] = (), broadcast: bool = True) -> None:
        self.reactor = reactor
        self.port = port
        self.bind_address = bind
        self.interfaces = interfaces
        self.broadcast = broadcast
        self._listening: Any = None
        self._targets: list[Address] = []
        self._networks: list[ipaddress.IPv4Network] = []

    def bind(self, deliver: Deliver) -> int:
        self._listening = self.reactor.listenUDP(self.port, _Receiver(deliver),
                                                 interface=self.bind_address)
        self._listening.setBroadcastAllowed(True)  # a static peer may be one
        bound: int = self._listening.getHost().port
        return bound

    def refresh(self) -> None:
        if self.broadcast:
            port = self.port or (self._listening.getHost().port if self._listening else 0)
            self._targets = [(address, port)
                             for address in broadcast_addresses(self.interfaces)]
            self._networks = broadcast_networks(self.interfaces)

    def cluster_addresses(self) -> list[Address]:
        return list(self._targets)

    def reaches(self, address: Address) -> bool:
        """Our broadcasts reach ``address``: unicast to it as well would only double traffic."""
        if not self._targets or address[1] != self._targets[0][1]:
            return False
        try:
            ip = ipaddress.IPv4Address(address[0])
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def send(self, datagram: bytes, address: Address) -> None:
        self._listening.write(datagram, address)

    def close(self) -> defer.Deferred[None]:
        listening, self._listening = self._listening, None
        if listening is None:
            return defer.succeed(None)
        return defer.maybeDeferred(listening.stopListening).addCallback(lambda _: None)


def parse_multicast_group(text: str) -> Address:
    """``239.1.2.3[:port]`` -> ``(group, port)``; the port defaults to 4002."""
    host, sep, port_text = str(text).strip().rpartition(":")
    if not sep:
        host, port_text = str(text).strip(), "4002"
    try:
        group = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 multicast group[:port]") from None
    if not group.is_multicast:
        raise ValueError(f"{host} is not an IPv4 multicast address (224.0.0.0/4)")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: the port must be 1-65535")
    return str(group), int(port_text)


@implementer(IDiscoveryTransport)
class MulticastTransport:
    """The ``multicast`` transport, for networks that filter broadcast but route multicast.

    Two sockets: the node's own discovery port sends everything and receives unicast, so
    peers record our unicast address; a second one on the group's port (shared with other
    nodes on the host) joins the group and receives what is sent to the cluster.
    """

    def __init__(self, reactor: Any, port: int, group: Address, *, ttl: int = 1,
                 interface: str = "", bind: str = "0.0.0.0") -> None:
        self.reactor = reactor
        self.port = port
        self.group = group
        self.ttl = ttl
        self.interface = interface
        self.bind_address = bind
        self._unicast: Any = None
        self._group_port: Any = None

    def bind(self, deliver: Deliver) -> int:
        self._unicast = self.reactor.listenMulticast(self.port, _Receiver(deliver),
                                                     interface=self.bind_address)
        self._unicast.setTTL(self.ttl)
        self._unicast.setLoopbackMode(1)  # other nodes on this host hear us too
        if self.interface:
            self._unicast.setOutgoingInterface(self.interface)
        self._group_port = self.reactor.listenMulticast(self.group[1], _Receiver(deliver),
                                                        listenMultiple=True)
        joined = self._group_port.joinGroup(self.group[0], self.interface or "")
        joined.addErrback(lambda f: log.error("cannot join multicast group {group}: {error}",
                                              group=self.group[0],
                                              error=f.getErrorMessage()))
        bound: int = self._unicast.getHost().port
        return bound

    def refresh(self) -> None:
        """The group does not change."""

    def cluster_addresses(self) -> list[Address]:
        return [self.group]

    def reaches(self, address: Address) -> bool:
        # Group membership is invisible to the sender: a unicast peer stays unicast.
        return False

    def send(self, datagram: bytes, address: Address) -> None:
        self._unicast.write(datagram, address)

    def close(self) -> defer.Deferred[None]:
        ports = [port for port in (self._group_port, self._unicast) if port is not None]
        self._group_port = self._unicast = None
        steps = [defer.maybeDeferred(port.stopListening) for port in ports]
        return defer.gatherResults(steps, consumeErrors=True).addCallback(lambda _: None)


def new_membership(clock: SecondsClock, settings: DiscoverySettings,
                   wall: Callable[[], float] | None = None) -> Membership:
    """The table a :class:`DiscoveryService` with ``settings`` keeps current; built apart
    when the node's other parts take it in their constructors before discovery exists."""
    return Membership(
        clock,
        suspect_after=settings.suspect_after,
        dead_after=settings.dead_after,
        prune_after=settings.prune_after,
        # Long enough for a member to come round again in a big peer's rotation.
        rumour_ttl=max(10.0, 4 * settings.dead_after),
        wall=wall,
    )


class DiscoveryService(service.MultiService):
    """Bind the discovery port, announce on a timer, keep ``membership`` current.

    ``reactor`` provides IReactorTime (IReactorUDP for the default transport, and
    IReactorThreads unless a ``resolver`` is given). ``transport`` (an
    IDiscoveryTransport) defaults to UDP broadcast built from ``settings``, ``membership``
    to :func:`new_membership`. ``wall`` stamps ``ts``/``last_seen``; it defaults to
    ``reactor.seconds`` so a ``task.Clock`` makes everything deterministic.
    """

    def __init__(
        self,
        reactor: Any,
        settings: DiscoverySettings,
        local_node: Callable[[], dict[str, Any]],
        peer_store: PeerStore,
        secret: str,
        *,
        wall: Callable[[], float] | None = None,
        resolver: Resolver | None = None,
        burst: int = 3,
        burst_spacing: float = 0.05,
        transport: DiscoveryTransport | None = None,
        membership: Membership | None = None,
    ) -> None:
        super().__init__()
        self.setName("discovery")
        self.reactor = reactor
        self.settings = settings
        self.local_node = local_node
        self.peer_store = peer_store
        self.wall: Callable[[], float] = reactor.seconds if wall is None else wall
        self.resolver: Resolver = resolver if resolver is not None else self._resolve_in_thread
        self.burst = burst
        self.burst_spacing = burst_spacing
        self.codec = Codec.from_secret(
            secret, reactor, window=settings.replay_window, wall=self.wall
        )
        self.membership = membership if membership is not None \
            else new_membership(reactor, settings, wall=self.wall)
        self.counters = new_counters()
        self.protocol = DiscoveryProtocol(self.codec, self._deliver, self.counters, reactor)
        self.bound = False
        self.port: int | None = None
        self.node_id: str | None = None
        self.transport: DiscoveryTransport = transport if transport is not None else UdpTransport(
            reactor, settings.port, bind=settings.bind, interfaces=settings.interfaces,
            broadcast=settings.broadcast)
        self._listening = False
        self._limit = _RateLimit(reactor)
        self._static_targets: dict[str, list[Address]] = {}
        self._resolving: set[str] = set()
        #: Node ids learned by gossip or heard by unicast: we announce to them by unicast.
        self._dynamic: set[str] = set()
        self._gossip_cursor = 0
        self._pending: list[Any] = []  # IDelayedCall
        self._saving: defer.Deferred[None] | None = None
        self._loading: defer.Deferred[None] | None = None
        interval = settings.announce_interval
        for step, what, func in (
            (settings.resolve_interval, "target refresh", self._refresh_targets),
            (interval, "announce", self._announce),
            (interval, "liveness check", self._check),
            (settings.save_interval, "peer save", self._save_if_dirty),
        ):
            timer = TimerService(step, _never_raise(what, func))
            timer.clock = reactor
            timer.setServiceParent(self)

    # -- lifecycle ----------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind the UDP socket before any service starts, so a taken port stops start-up."""
        if self.settings.enabled and not self._listening:
            self._bind()
        super().privilegedStartService()

    def _bind(self) -> None:
        self.port = self.transport.bind(self.protocol.datagramReceived)
        self._listening = True

    def startService(self) -> None:
        if not self.settings.enabled:
            service.Service.startService(self)
            return
        self.node_id = self.local_node()["node_id"]
        if not self._listening:
            self._bind()
        self.bound = True
        log.info("discovery bound on {bind}:{port}", bind=self.settings.bind, port=self.port)
        self._refresh_targets()
        # The newcomer asks first so that every peer answers at once by unicast.
        self._send_all(wire.QUERY, {})
        super().startService()  # timers: the announce timer sends the burst's first one
        for i in range(1, self.burst):
            call = self.reactor.callLater(
                i * self.burst_spacing, _never_raise("announce", self._announce)
            )
            self._pending.append(call)
        self._loading = self.peer_store.load_peers().addCallback(self._loaded)
        self._loading.addErrback(lambda f: log.failure("loading stored peers failed", f))

    def stopService(self) -> defer.Deferred[None]:
        if not self.bound:
            stopped = defer.maybeDeferred(super().stopService)
            if self._listening:  # bound at privileged start, never started
                self._listening = False
                stopped.addCallback(lambda _: self.transport.close())
            return stopped.addCallback(lambda _: None)
        for call in self._pending:
            if call.active():
                call.cancel()
        self._pending.clear()
        self._send_all(wire.LEAVE, {})
        steps: list[defer.Deferred[Any]] = [defer.maybeDeferred(super().stopService)]
        saved = defer.maybeDeferred(self.peer_store.save_peers, self.membership.records())
        saved.addErrback(lambda f: log.failure("saving peers on stop failed", f))
        steps.append(saved)
        closed = defer.maybeDeferred(self.transport.close)
        steps.append(closed.addBoth(self._closed))
        return defer.gatherResults(steps, consumeErrors=True).addCallback(lambda _: None)

    def _closed(self, result: Any) -> None:
        self.bound = False
        self._listening = False
        log.info("discovery closed port {port}", port=self.port)

    def _loaded(self, records: list[dict[str, Any]]) -> None:
        added = self.membership.load(records)
        log.info("loaded {count} stored peers as stale", count=added)
        # Stored addresses may be the only way to reach peers without broadcast.
        for peer in self.membership.peers():
            if peer.state is PeerState.STALE:
                self._send(wire.QUERY, {}, (peer.ip_address, peer.discovery_port))

    # -- targets ------------------------------------------------------------------------

    def targets(self) -> list[Address]:
        """Every address an announce goes to: broadcasts, static peers, dynamic peers."""
        seen: dict[Address, None] = dict.fromkeys(self._broadcast_targets)
        seen.update(dict.fromkeys(self.unicast_targets()))
        return list(seen)

    def unicast_targets(self) -> list[Address]:
        """Resolved static peers, then dynamic ones: the addresses that get gossip."""
        seen: dict[Address, None] = {}
        for addresses in self._static_targets.values():
            seen.update(dict.fromkeys(addresses))
        for rumour in self.membership.rumours():
            seen[(rumour.ip_address, rumour.discovery_port)] = None
        for node_id in list(self._dynamic):
            peer = self.membership.get(node_id)
            if peer is None:
                self._dynamic.discard(node_id)  # pruned: forget it here too
            elif peer.state in (PeerState.ALIVE, PeerState.SUSPECT) \
                    and not self._broadcast_reaches((peer.ip_address, peer.discovery_port)):
                seen[(peer.ip_address, peer.discovery_port)] = None
        for address in self._broadcast_targets:
            seen.pop(address, None)
        return list(seen)

    @property
    def _broadcast_targets(self) -> list[Address]:
        """Asked of the transport each time: one whose cluster changes (the Unix-socket
        demo's directory) answers without waiting for the next refresh."""
        return list(self.transport.cluster_addresses())

    def _broadcast_reaches(self, address: Address) -> bool:
        """A datagram to the cluster reaches ``address``: unicast would only double traffic."""
        return bool(self._broadcast_targets) and bool(self.transport.reaches(address))

    def _refresh_targets(self) -> None:
        self.transport.refresh()
        for spec in self.settings.peers:
            host, port = parse_peer(spec, self.settings.port)
            if _is_ipv4(host):
                self._static_targets[spec] = [(host, port)]
            elif spec not in self._resolving:
                self._resolving.add(spec)
                d = defer.maybeDeferred(self.resolver, host)
                d.addCallbacks(self._resolved, self._resolve_failed,
                               callbackArgs=(spec, port), errbackArgs=(spec,))

    def _resolve_in_thread(self, host: str) -> defer.Deferred[list[str]]:
        pool = self.reactor.getThreadPool()
        return threads.deferToThreadPool(self.reactor, pool, _getaddrinfo_v4, host)

    def _resolved(self, hosts: list[str], spec: str, port: int) -> None:
        self._resolving.discard(spec)
        if not self.running:
            return
        old = set(self._static_targets.get(spec, []))
        self._static_targets[spec] = [(host, port) for host in hosts]
        for address in self._static_targets[spec]:
            if address not in old:
                # A peer that appeared behind the name learns of us (and we of it) now.
                self._send(wire.QUERY, {}, address)
                self._announce_to([address])

    def _resolve_failed(self, failure: Any, spec: str) -> None:
        self._resolving.discard(spec)
        # Keep the previous addresses: a DNS hiccup must not cut us off from peers.
        if self._limit.allow("resolve:" + spec) is not None:
            log.warn("resolving discovery peer {spec} failed: {error}",
                     spec=spec, error=failure.getErrorMessage())

    # -- sending ------------------------------------------------------------------------

    def _send(self, type_: str, body: dict[str, Any], address: Address) -> None:
        # One encoding per target: fresh nonces, so a datagram that reaches a peer by
        # broadcast and by unicast is not counted as a replay.
        if not self.bound or self.node_id is None:
            return  # a late callback (DNS, store) after stopService
        try:
            data = self.codec.encode(type_, self.node_id, body)
        except WireError as e:
            self.counters["errors"]["encode"] += 1
            if self._limit.allow("encode") is not None:
                log.error("cannot encode our own {type}: {error}", type=type_, error=e)
            return
        try:
            self.transport.send(data, address)
        except Exception as e:
            self.counters["errors"]["send"] += 1
            if self._limit.allow(f"send:{address[0]}") is not None:
                log.warn("sending discovery {type} to {address} failed: {error}",
                         type=type_, address=address, error=e)
            return
        self.counters["sent"][type_] += 1

    def _send_all(self, type_: str, body: dict[str, Any]) -> None:
        for address in self.targets():
            self._send(type_, body, address)

    def _announce_to(self, addresses: list[Address]) -> None:
        """Unicast announces, each with its share of gossip (answers, new targets)."""
        body = self.local_node()  # called every time so the stats are fresh
        members = self.membership.gossip()
        sent = 0
        for address in addresses:
            sent = self._send_announce(body, members, address)
        if members:
            self._gossip_cursor = (self._gossip_cursor + max(1, sent)) % len(members)

    def _send_announce(self, body: dict[str, Any], members: list[wire.Member],
                       address: Address) -> int:
        """Send ``body`` plus as many members as fit, starting at the rotation cursor."""
        others = [m for m in members if (m.ip, m.discovery_port) != address]
        if others:
            start = self._gossip_cursor % len(others)
            others = (others[start:] + others[:start])[:wire.MAX_MEMBERS]
        while True:
            gossip = {**body, "members": [member.to_json() for member in others]}
            if not others or self._fits(gossip):
                self._send(wire.ANNOUNCE, gossip, address)
                return len(others)
            others = others[: len(others) // 2]

    def _fits(self, body: dict[str, Any]) -> bool:
        assert self.node_id is not None
        try:
            wire.encode(self.codec.key, wire.ANNOUNCE, self.node_id, body,
                        ts=self.wall(), nonce="0" * 16)
        except WireError as e:
            return e.reason != "oversized"
        return True

    def _announce(self) -> None:
        if not self.bound:
            return
        body = self.local_node()
        for address in self._broadcast_targets:
            self._send(wire.ANNOUNCE, body, address)
        self._announce_to(self.unicast_targets())

    # -- receiving ----------------------------------------------------------------------

    def _deliver(self, message: Message, address: Address) -> None:
        if message.node_id == self.node_id:
            self.counters["ignored"]["own"] += 1
            return
        self.counters["received"][message.type] += 1
        if message.type == wire.ANNOUNCE:
            self.membership.announce_received(message.node_id, message.body, address)
            if message.version >= 2:
                self._gossip_received(message, address)
        elif message.type == wire.QUERY:
            self.membership.heard(message.node_id, address)
            self._announce_to([address])
        elif message.type == wire.LEAVE:
            self.membership.leave_received(message.node_id)

    def _gossip_received(self, message: Message, address: Address) -> None:
        # A unicast announce: the sender reaches us without broadcast, so answer in kind.
        self._dynamic.add(message.node_id)
        assert self.node_id is not None
        new, refused = self.membership.gossip_received(
            message.node_id, message.members, address, self.node_id)
        self.counters["gossip"]["dropped"] += message.dropped_members + refused
        self.counters["gossip"]["learned"] += len(new)
        if message.dropped_members + refused \
                and self._limit.allow("gossip:" + message.node_id) is not None:
            log.warn("dropped {count} bad gossip entries from {node_id}",
                         count=message.dropped_members + refused, node_id=message.node_id)
        for rumour in new:
            self._dynamic.add(rumour.node_id)
            target = (rumour.ip_address, rumour.discovery_port)
            # Ask and tell at once: the new node answers by unicast and learns of us.
            self._send(wire.QUERY, {}, target)
            self._announce_to([target])

    # -- timers -------------------------------------------------------------------------

    def _check(self) -> None:
        self.membership.check()
        if not self.bound:
            return
        # Active probe: a suspect peer gets a unicast query each tick, so a few lost
        # broadcasts do not add up to a false "dead".
        for peer in self.membership.peers():
            if peer.state is PeerState.SUSPECT:
                self._send(wire.QUERY, {}, (peer.ip_address, peer.discovery_port))

    def _save_if_dirty(self) -> None:
        if not self.membership.dirty or self._saving is not None:
            return
        d = defer.maybeDeferred(self.peer_store.save_peers, self.membership.records())

        def failed(failure: Any) -> None:
            self.membership.dirty = True
            log.failure("saving peers failed", failure)

        def done(_: Any) -> None:
            self._saving = None

        d.addErrback(failed)
        d.addBoth(done)
        if not d.called:
            self._saving = d


__all__ = [
    "DiscoveryProtocol",
    "DiscoveryService",
    "DiscoverySettings",
    "MulticastTransport",
    "UdpTransport",
    "broadcast_addresses",
    "broadcast_networks",
    "new_counters",
    "new_membership",
    "parse_multicast_group",
    "parse_peer",
]

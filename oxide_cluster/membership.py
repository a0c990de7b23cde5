"""The peer table: who is out there and whether they are alive, independent of transport.

Liveness is judged on the injected clock only. A peer is never declared dead on one missed
datagram: it turns ``suspect`` after ``suspect_after`` seconds of silence, ``dead`` after
``dead_after`` and is forgotten after ``prune_after``. Peers reloaded from disk are
``stale`` until heard.

Gossip: peers pass on the members they hear themselves. What a node learns that way is a
``Rumour`` (an address to contact), never a ``Peer``: only a node's own datagrams make it
a peer or keep it alive, so a gossiped entry cannot keep a dead node alive. A rumour
expires ``rumour_ttl`` seconds after it was last repeated.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, Protocol

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from oxide_cluster.clock import SecondsClock
from oxide_cluster.model import rfc3339
from oxide_cluster.wire import Member

log = Logger()

Listener = Callable[[dict[str, Any]], None]

_EMPTY_STATS: dict[str, Any] = {
    "cpu_percent": None,
    "memory_percent": None,
    "load": None,
    "running_tasks": None,
    "free_slots": None,
}


# Shown only when the peer announced them: draining, and declared-resource capacity.
_OPTIONAL_STATS = ("draining", "allocatable_cpus", "allocatable_memory", "free_cpus",
                   "free_memory")


class PeerState(enum.Enum):
    """Where a peer stands; only ``ALIVE`` counts as healthy."""

    STALE = "stale"
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@attrs.define
class Peer:
    """What we know of one remote node; ``last_heard`` is on the reactor clock."""

    node_id: str
    ip_address: str
    discovery_port: int
    state: PeerState
    last_heard: float
    last_seen_wall: float | None = None
    hostname: str = ""
    api_port: int = 0
    labels: dict[str, str] = attrs.Factory(dict)
    services: list[str] = attrs.Factory(list)
    version: str = ""
    started_at: float | None = None
    stats: dict[str, Any] = attrs.Factory(lambda: dict(_EMPTY_STATS))
    leader: dict[str, Any] | None = None

    @property
    def healthy(self) -> bool:
        return self.state is PeerState.ALIVE


@attrs.define
class Rumour:
    """A node some peer hears and we have not heard ourselves yet: where to reach it."""

    node_id: str
    ip_address: str
    api_port: int
    discovery_port: int
    via: str
    heard_at: float


def _is_loopback(ip: str) -> bool:
    return ip.startswith("127.")


def _parse_rfc3339(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def node_json(peer: Peer) -> dict[str, Any]:
    """The contract node shape of ``/api/cluster/nodes`` (``is_leader`` is added there).

    ``peer.leader`` (the peer's own claim, since in unix seconds) stays internal: the API
    states the leader once, at the top of ``/api/cluster/nodes``.
    """
    return {
        "node_id": peer.node_id,
        "hostname": peer.hostname,
        "ip_address": peer.ip_address,
        "api_port": peer.api_port,
        "state": peer.state.value,
        "healthy": peer.healthy,
        "last_seen": rfc3339(peer.last_seen_wall),
        "labels": dict(peer.labels),
        "services": list(peer.services),
        "stats": {**{key: peer.stats.get(key) for key in _EMPTY_STATS},
                  **{key: peer.stats[key] for key in _OPTIONAL_STATS if key in peer.stats}},
    }


def peer_record(peer: Peer) -> dict[str, Any]:
    """What the store keeps: the node shape plus what we need to probe it after a restart."""
    record = node_json(peer)
    record.update(
        discovery_port=peer.discovery_port, version=peer.version, started_at=peer.started_at
    )
    return record


class PeerStore(Protocol):
    """Persistence of the peer table across restarts (the core's SQLite store implements it)."""

    def load_peers(self) -> defer.Deferred[list[dict[str, Any]]]: ...

    def save_peers(self, peers: list[dict[str, Any]]) -> defer.Deferred[None]: ...


@attrs.define
class MemoryPeerStore:
    """A ``PeerStore`` in memory, for tests and for nodes without a state directory."""

    peers: list[dict[str, Any]] = attrs.Factory(list)
    saves: int = 0

    def load_peers(self) -> defer.Deferred[list[dict[str, Any]]]:
        return defer.succeed([dict(p) for p in self.peers])

    def save_peers(self, peers: list[dict[str, Any]]) -> defer.Deferred[None]:
        self.peers = [dict(p) for p in peers]
        self.saves += 1
        return defer.succeed(None)


class Membership:
    """The peer table, driven by calls from a transport and by ``check()`` on a timer."""

    def __init__(
        self,
        clock: SecondsClock,
        *,
        suspect_after: float = 1.0,
        dead_after: float = 2.5,
        prune_after: float = 300.0,
        rumour_ttl: float = 10.0,
        wall: Callable[[], float] | None = None,
    ) -> None:
        if not 0 < suspect_after < dead_after <= prune_after:
            raise ValueError("need 0 < suspect_after < dead_after <= prune_after")
        if not rumour_ttl > 0:
            raise ValueError("rumour_ttl must be positive")
        self.clock = clock
        self.wall = clock.seconds if wall is None else wall
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.prune_after = prune_after
        self.rumour_ttl = rumour_ttl
        self._peers: dict[str, Peer] = {}
        self._rumours: dict[str, Rumour] = {}
        self._listeners: list[Listener] = []
        #: Set when something worth persisting changed; cleared by ``records()``.
        self.dirty = False

    # -- reading ------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def get(self, node_id: str) -> Peer | None:
        return self._peers.get(node_id)

    def healthy(self) -> list[Peer]:
        return [peer for peer in self._peers.values() if peer.healthy]

    def rumours(self) -> list[Rumour]:
        """Gossiped nodes not (or no longer) heard directly, still being repeated."""
        return list(self._rumours.values())

    def rumour(self, node_id: str) -> Rumour | None:
        return self._rumours.get(node_id)

    def gossip(self) -> list[Member]:
        """What we pass on: the peers we hear ourselves, alive, with a usable address."""
        return [
            Member(peer.node_id, peer.ip_address, peer.api_port, peer.discovery_port)
            for peer in sorted(self._peers.values(), key=lambda p: p.node_id)
            if peer.healthy and peer.api_port > 0 and peer.discovery_port > 0
        ]

    def __iter__(self) -> Iterator[Peer]:
        return iter(self.peers())

    def __len__(self) -> int:
        return len(self._peers)

    # -- events -------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every change event; returns an unsubscribe callable."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def _emit(self, event: str, peer: Peer) -> None:
        self.dirty = True
        log.info(
            "peer {node_id} at {ip}: {event}", node_id=peer.node_id, ip=peer.ip_address, event=event
        )
        payload = {"type": "node", "event": event, "node": node_json(peer)}
        for listener in list(self._listeners):
            try:
                listener(payload)
            except Exception:
                log.failure("membership listener {listener!r} failed", listener=listener)

    # -- input from the transport --------------------------------------------------

    def announce_received(
        self, node_id: str, body: dict[str, Any], address: tuple[str, int]
    ) -> Peer:
        """A peer described itself: record it and bring it (back) to ``alive``."""
        peer = self._peers.get(node_id)
        event: str | None = None
        if peer is None:
            peer = Peer(node_id, address[0], address[1], PeerState.ALIVE, self.clock.seconds())
            self._peers[node_id] = peer
            event = "joined"
        elif peer.state is PeerState.LEFT:
            event = "joined"
        elif (
            peer.state in (PeerState.ALIVE, PeerState.SUSPECT, PeerState.DEAD)
            and peer.started_at is not None
            and peer.started_at != body["started_at"]
        ):
            # Same node_id, new process: whatever it was running is gone.
            event = "restarted"
        elif peer.state is not PeerState.ALIVE:
            event = "alive"
        if (peer.ip_address, peer.discovery_port) != address:
            self.dirty = True
        peer.ip_address, peer.discovery_port = address
        peer.hostname = body["hostname"]
        peer.api_port = body["api_port"]
        peer.labels = dict(body["labels"])
        peer.services = list(body["services"])
        peer.version = body["version"]
        peer.started_at = body["started_at"]
        peer.stats = dict(body["stats"])
        peer.leader = body["leader"]
        self._rumours.pop(node_id, None)  # heard directly: the rumour has done its job
        self._touch(peer)
        if event is not None:
            self._emit(event, peer)
        return peer

    def heard(self, node_id: str, address: tuple[str, int]) -> Peer | None:
        """Any other authenticated datagram: proof of life for a peer we already trust.

        A dead, stale or departed peer waits for its ``announce``: it may have restarted
        with another identity behind the same node_id.
        """
        peer = self._peers.get(node_id)
        if peer is None or peer.state not in (PeerState.ALIVE, PeerState.SUSPECT):
            return peer
        if (peer.ip_address, peer.discovery_port) != address:
            return peer
        was_suspect = peer.state is PeerState.SUSPECT
        self._touch(peer)
        if was_suspect:
            self._emit("alive", peer)
        return peer

    def leave_received(self, node_id: str) -> None:
        """A clean shutdown: drop the peer from the healthy set at once."""
        peer = self._peers.get(node_id)
        if peer is None or peer.state is PeerState.LEFT:
            return
        peer.state = PeerState.LEFT
        peer.last_heard = self.clock.seconds()
        peer.last_seen_wall = self.wall()
        self._emit("left", peer)

    def gossip_received(
        self, sender: str, members: Iterable[Member], address: tuple[str, int], self_id: str
    ) -> tuple[list[Rumour], int]:
        """``sender`` (at ``address``) hears ``members``: note the ones we do not hear.

        Returns the rumours that are new and how many entries were refused: a loopback
        address from a sender that is not on loopback would point at ourselves. Peers we
        hear (alive or suspect) are left alone; a stale, dead or departed one becomes a
        rumour too, so the transport contacts it, but its state changes only when it
        speaks for itself.
        """
        now = self.clock.seconds()
        new: list[Rumour] = []
        refused = 0
        for member in members:
            if member.node_id in (self_id, sender):
                continue
            if _is_loopback(member.ip) and not _is_loopback(address[0]):
                refused += 1
                continue
            peer = self._peers.get(member.node_id)
            if peer is not None and peer.state in (PeerState.ALIVE, PeerState.SUSPECT):
                continue
            rumour = self._rumours.get(member.node_id)
            if rumour is None:
                rumour = Rumour(member.node_id, member.ip, member.api_port,
                                member.discovery_port, sender, now)
                self._rumours[member.node_id] = rumour
                new.append(rumour)
                log.info("peer {node_id} at {ip} learned from {via}",
                         node_id=member.node_id, ip=member.ip, via=sender)
            else:
                rumour.ip_address, rumour.api_port = member.ip, member.api_port
                rumour.discovery_port, rumour.via = member.discovery_port, sender
                rumour.heard_at = now
        return new, refused

    def _touch(self, peer: Peer) -> None:
        peer.state = PeerState.ALIVE
        peer.last_heard = self.clock.seconds()
        peer.last_seen_wall = self.wall()

    # -- timers ---------------------------------------------------------------------

    def check(self) -> None:
        """Apply the silence thresholds; call it at least every ``suspect_after / 2``."""
        now = self.clock.seconds()
        for rumour in list(self._rumours.values()):
            if now - rumour.heard_at >= self.rumour_ttl:
                del self._rumours[rumour.node_id]
        for peer in list(self._peers.values()):
            silence = now - peer.last_heard
            if peer.state in (PeerState.ALIVE, PeerState.SUSPECT) and silence >= self.dead_after:
                peer.state = PeerState.DEAD
                self._emit("dead", peer)
            elif peer.state is PeerState.ALIVE and silence >= self.suspect_after:
                peer.state = PeerState.SUSPECT
                self._emit("suspect", peer)
            elif silence >= self.prune_after:
                del self._peers[peer.node_id]
                self._emit("pruned", peer)

    # -- persistence ----------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        """Records for ``PeerStore.save_peers``; clears ``dirty``."""
        self.dirty = False
        return [peer_record(peer) for peer in self._peers.values()]

    def load(self, records: list[dict[str, Any]]) -> int:
        """Add stored peers as ``stale`` (never overriding one already heard); returns count."""
        now = self.clock.seconds()
        added = 0
        for record in records:
            try:
                peer = Peer(
                    node_id=_field(record, "node_id", str),
                    ip_address=_field(record, "ip_address", str),
                    discovery_port=_field(record, "discovery_port", int),
                    state=PeerState.STALE,
                    last_heard=now,
                    last_seen_wall=_parse_rfc3339(record.get("last_seen")),
                    hostname=str(record.get("hostname") or ""),
                    api_port=int(record.get("api_port") or 0),
                    labels=dict(record.get("labels") or {}),
                    services=list(record.get("services") or []),
                    version=str(record.get("version") or ""),
                    started_at=record.get("started_at"),
                    stats={**_EMPTY_STATS, **dict(record.get("stats") or {})},
                    leader=None,
                )
            except (TypeError, ValueError, KeyError, AttributeError) as e:
                log.warn("ignoring stored peer record {record!r}: {error}", record=record, error=e)
                continue
            if peer.node_id in self._peers:
                continue
            self._peers[peer.node_id] = peer
            added += 1
        return added


def _field(record: dict[str, Any], name: str, kind: type) -> Any:
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{name} must be {kind.__name__}")
    return value

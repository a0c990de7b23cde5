"""The peer table on a task.Clock: silence thresholds, leave, events, persistence."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from oxide_cluster.membership import (
    Membership,
    MemoryPeerStore,
    PeerState,
    node_json,
)

ADDR = ("10.0.0.2", 4001)
WALL = 1_700_000_000.0


def body(node_id: str = "node-b", started_at: float = 100.0) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "hostname": "host-b",
        "api_port": 8080,
        "services": ["executor"],
        "labels": {"gpu": "no"},
        "version": "0.1.0",
        "started_at": started_at,
        "stats": {
            "cpu_percent": 1.0,
            "memory_percent": 2.0,
            "load": [0.1, 0.2, 0.3],
            "running_tasks": 0,
            "free_slots": 4,
        },
        "leader": None,
    }


def make() -> tuple[Clock, Membership, list[dict[str, Any]]]:
    clock = Clock()
    members = Membership(
        clock, suspect_after=1.0, dead_after=2.5, prune_after=10.0,
        wall=lambda: WALL + clock.seconds(),
    )
    events: list[dict[str, Any]] = []
    members.subscribe(events.append)
    return clock, members, events


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def advance(clock: Clock, members: Membership, seconds: float, step: float = 0.25) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)
        members.check()


def test_announce_joins_and_node_json_has_contract_shape() -> None:
    _, members, events = make()
    members.announce_received("node-b", body(), ADDR)
    assert names(events) == ["joined"]
    node = events[0]["node"]
    assert events[0]["type"] == "node"
    assert set(node) == {
        "node_id", "hostname", "ip_address", "api_port", "state", "healthy",
        "last_seen", "labels", "services", "stats",
    }
    assert node["ip_address"] == "10.0.0.2" and node["state"] == "alive" and node["healthy"]
    assert node["last_seen"] == "2023-11-14T22:13:20.000Z"
    assert set(node["stats"]) == {
        "cpu_percent", "memory_percent", "load", "running_tasks", "free_slots"
    }


def test_a_peers_leader_claim_is_kept_but_not_a_second_leader_field() -> None:
    """/api/cluster/nodes states the leader once at the top (see tests/unit/test_node.py)."""
    _, members, _ = make()
    leader = {"node_id": "node-b", "token": 3, "since": 1_700_000_000.5}
    peer = members.announce_received("node-b", {**body(), "leader": leader}, ADDR)
    assert peer.leader == leader
    assert "leader" not in node_json(peer)


def test_one_missed_interval_changes_nothing() -> None:
    clock, members, events = make()
    members.announce_received("node-b", body(), ADDR)
    advance(clock, members, 0.75)
    assert members.get("node-b").state is PeerState.ALIVE  # type: ignore[union-attr]
    assert names(events) == ["joined"]


def test_silence_makes_suspect_then_dead_then_pruned() -> None:
    clock, members, events = make()
    members.announce_received("node-b", body(), ADDR)
    advance(clock, members, 1.0)
    assert names(events) == ["joined", "suspect"]
    assert not node_json(members.get("node-b"))["healthy"]  # type: ignore[arg-type]
    advance(clock, members, 1.25)
    assert names(events) == ["joined", "suspect"]
    advance(clock, members, 0.25)
    assert names(events) == ["joined", "suspect", "dead"]
    advance(clock, members, 7.5)
    assert names(events)[-1] == "pruned" and members.get("node-b") is None


def test_suspect_peer_heard_again_is_alive() -> None:
    clock, members, events = make()
    members.announce_received("node-b", body(), ADDR)
    advance(clock, members, 1.5)
    members.heard("node-b", ADDR)
    assert names(events) == ["joined", "suspect", "alive"]
    advance(clock, members, 2.0)
    assert members.get("node-b").state is PeerState.SUSPECT  # type: ignore[union-attr]


def test_dead_peer_needs_an_announce_to_come_back() -> None:
    clock, members, events = make()
    members.announce_received("node-b", body(), ADDR)
    advance(clock, members, 3.0)
    members.heard("node-b", ADDR)
    assert members.get("node-b").state is PeerState.DEAD  # type: ignore[union-attr]
    members.announce_received("node-b", body(), ADDR)
    assert names(events) == ["joined", "suspect", "dead", "alive"]


def test_leave_removes_from_healthy_at_once() -> None:
    _, members, events = make()
    members.announce_received("node-b", body(), ADDR)
    members.leave_received("node-b")
    members.leave_received("node-b")
    assert names(events) == ["joined", "left"]
    assert members.healthy() == []
    members.announce_received("node-b", body(started_at=200.0), ADDR)
    assert names(events)[-1] == "joined"


def test_new_started_at_reports_a_restart() -> None:
    _, members, events = make()
    members.announce_received("node-b", body(started_at=100.0), ADDR)
    members.announce_received("node-b", body(started_at=100.0), ADDR)
    members.announce_received("node-b", body(started_at=150.0), ADDR)
    assert names(events) == ["joined", "restarted"]


def test_stored_peers_load_stale_and_round_trip() -> None:
    _, members, _ = make()
    members.announce_received("node-b", body(), ADDR)
    store = MemoryPeerStore()
    store.save_peers(members.records())
    assert not members.dirty

    clock2 = Clock()
    fresh = Membership(clock2, suspect_after=1.0, dead_after=2.5, prune_after=10.0)
    loaded: list[dict[str, Any]] = []
    store.load_peers().addCallback(loaded.extend)
    assert fresh.load(loaded + [{"node_id": 5}, {"garbage": True}]) == 1
    peer = fresh.get("node-b")
    assert peer is not None and peer.state is PeerState.STALE and not peer.healthy
    assert (peer.ip_address, peer.discovery_port, peer.api_port) == ("10.0.0.2", 4001, 8080)
    assert node_json(peer)["last_seen"] == node_json(members.get("node-b"))["last_seen"]  # type: ignore[arg-type]


def test_stale_peer_turns_alive_when_heard_and_is_pruned_otherwise() -> None:
    clock, members, events = make()
    members.load([{"node_id": "node-b", "ip_address": "10.0.0.2", "discovery_port": 4001},
                  {"node_id": "node-c", "ip_address": "10.0.0.3", "discovery_port": 4001}])
    members.announce_received("node-b", body(), ADDR)
    advance(clock, members, 10.0)
    assert ("alive", "node-b") in [(e["event"], e["node"]["node_id"]) for e in events]
    assert ("pruned", "node-c") in [(e["event"], e["node"]["node_id"]) for e in events]


def test_load_never_overrides_a_peer_already_heard() -> None:
    _, members, _ = make()
    members.announce_received("node-b", body(), ADDR)
    members.load([{"node_id": "node-b", "ip_address": "10.9.9.9", "discovery_port": 1}])
    assert members.get("node-b").ip_address == "10.0.0.2"  # type: ignore[union-attr]


def test_failing_listener_does_not_stop_the_others() -> None:
    _, members, events = make()

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    members.subscribe(broken)
    seen: list[dict[str, Any]] = []
    unsubscribe = members.subscribe(seen.append)
    members.announce_received("node-b", body(), ADDR)
    unsubscribe()
    members.leave_received("node-b")
    assert names(seen) == ["joined"] and names(events) == ["joined", "left"]


def test_thresholds_are_validated() -> None:
    with pytest.raises(ValueError):
        Membership(Clock(), suspect_after=3.0, dead_after=2.0)


# -- gossip -----------------------------------------------------------------------------


def member(node_id: str, ip: str = "10.0.0.3", api: int = 4010, disc: int = 4011) -> Any:
    from oxide_cluster.wire import Member

    return Member(node_id, ip, api, disc)


def test_gossip_about_an_unknown_node_is_a_rumour_not_a_peer() -> None:
    clock, members, events = make()
    new, refused = members.gossip_received("node-b", [member("node-c")], ADDR, "node-a")
    assert [r.node_id for r in new] == ["node-c"] and refused == 0
    rumour = members.rumour("node-c")
    assert rumour is not None and (rumour.ip_address, rumour.api_port,
                                   rumour.discovery_port, rumour.via) == \
        ("10.0.0.3", 4010, 4011, "node-b")
    assert members.get("node-c") is None and events == []
    # Repeating it is not news, and keeps it from expiring.
    for _ in range(8):
        advance(clock, members, 2.0)
        assert members.gossip_received("node-b", [member("node-c")], ADDR, "node-a")[0] == []
    assert members.rumour("node-c") is not None
    advance(clock, members, members.rumour_ttl)
    assert members.rumours() == []


def test_hearing_a_rumoured_node_directly_makes_it_a_peer() -> None:
    _, members, events = make()
    members.gossip_received("node-b", [member("node-c")], ADDR, "node-a")
    members.announce_received("node-c", body("node-c"), ("10.0.0.3", 4011))
    assert members.rumours() == []
    peer = members.get("node-c")
    assert peer is not None and peer.state is PeerState.ALIVE
    assert names(events) == ["joined"]


def test_gossip_never_keeps_a_dead_peer_alive() -> None:
    clock, members, events = make()
    members.announce_received("node-c", body("node-c"), ("10.0.0.3", 4011))
    for _ in range(20):  # node-b keeps saying node-c is there; node-c itself is silent
        advance(clock, members, 0.25)
        members.gossip_received("node-b", [member("node-c")], ADDR, "node-a")
    peer = members.get("node-c")
    assert peer is not None and peer.state is PeerState.DEAD
    assert names(events) == ["joined", "suspect", "dead"]
    # ...but it is worth contacting: the rumour says where.
    assert members.rumour("node-c") is not None
    assert "node-c" not in [m.node_id for m in members.gossip()]


def test_gossip_skips_self_sender_live_peers_and_foreign_loopback() -> None:
    _, members, _ = make()
    members.announce_received("node-c", body("node-c"), ("10.0.0.3", 4011))
    new, refused = members.gossip_received(
        "node-b",
        [member("node-a"), member("node-b"), member("node-c", ip="10.9.9.9"),
         member("node-d", ip="127.0.0.1")],
        ADDR, "node-a")
    assert new == [] and refused == 1 and members.rumours() == []
    peer = members.get("node-c")
    assert peer is not None and peer.ip_address == "10.0.0.3"  # gossip moved nothing
    # From a loopback sender a loopback address is the normal case (one host).
    new, refused = members.gossip_received("node-b", [member("node-d", ip="127.0.0.1")],
                                           ("127.0.0.1", 4001), "node-a")
    assert [r.node_id for r in new] == ["node-d"] and refused == 0


def test_gossip_lists_only_healthy_peers_heard_directly() -> None:
    clock, members, _ = make()
    members.announce_received("node-c", body("node-c"), ("10.0.0.3", 4011))
    members.announce_received("node-d", {**body("node-d"), "api_port": 0}, ("10.0.0.4", 4011))
    members.gossip_received("node-c", [member("node-e")], ("10.0.0.3", 4011), "node-a")
    assert [(m.node_id, m.ip, m.api_port, m.discovery_port) for m in members.gossip()] == \
        [("node-c", "10.0.0.3", 8080, 4011)]
    advance(clock, members, 1.0)  # suspect now
    assert members.gossip() == []

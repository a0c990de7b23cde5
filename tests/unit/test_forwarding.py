"""PeerClient routing: healthy peers first, then nodes known only by gossip."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from oxide_cluster.forwarding import PeerClient
from oxide_cluster.membership import Membership
from oxide_cluster.wire import Member


def client() -> tuple[PeerClient, Membership, Clock]:
    clock = Clock()
    membership = Membership(clock)
    return PeerClient(MemoryReactorClock(), "s", SimpleNamespace(membership=membership)), \
        membership, clock


def test_a_node_known_only_by_gossip_is_routed_to_its_gossiped_api() -> None:
    peers, membership, clock = client()
    assert not peers.knows("node-c") and peers.address_of("node-c") is None
    membership.gossip_received("node-b", [Member("node-c", "10.0.0.3", 4010, 4011)],
                               ("10.0.0.2", 4001), "node-a")
    assert peers.knows("node-c")
    assert peers.address_of("node-c") == "http://10.0.0.3:4010"
    clock.advance(membership.rumour_ttl)
    membership.check()
    assert not peers.knows("node-c") and peers.address_of("node-c") is None

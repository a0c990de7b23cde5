"""PeerClient routing: healthy peers first, then nodes known only by gossip."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from oxide_cluster.forwarding import PeerClient, PeerUnavailable
from oxide_cluster.membership import Membership
from oxide_cluster.wire import Member


def client() -> tuple[PeerClient, Membership, Clock]:
    clock = Clock()
    membership = Membership(clock)
    return PeerClient(MemoryReactorClock(), "s", membership), \
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


def _request_to_node_b(peers: PeerClient, membership: Membership) -> list:
    membership.gossip_received("node-a", [Member("node-b", "10.0.0.2", 4010, 4011)],
                               ("10.0.0.1", 4001), "node-c")
    failures: list = []
    defer.Deferred.fromCoroutine(
        peers.request("node-b", b"POST", b"/internal/run", b"{}")).addErrback(failures.append)
    return failures


def test_a_refused_connection_is_known_never_sent() -> None:
    """Nothing reached the peer: the task may safely be tried on another node."""
    reactor = MemoryReactorClock()
    membership = Membership(Clock())
    peers = PeerClient(reactor, "s", membership)
    failures = _request_to_node_b(peers, membership)
    _, port, factory, _, _ = reactor.tcpClients[0]
    assert port == 4010
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    reactor.advance(1)  # the endpoint gives up once no address is left to try
    assert failures and failures[0].check(PeerUnavailable)
    assert failures[0].value.sent is False


def test_a_request_that_timed_out_may_have_been_sent() -> None:
    """Connected, then no answer: the peer may have acted on it."""
    reactor = MemoryReactorClock()
    membership = Membership(Clock())
    peers = PeerClient(reactor, "s", membership, timeout=5)
    failures = _request_to_node_b(peers, membership)
    _, _, factory, _, _ = reactor.tcpClients[0]
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    reactor.advance(6)
    assert failures and failures[0].check(PeerUnavailable)
    assert failures[0].value.sent is True

"""Requests from this node to its peers: the owner of a task, the leader, a placed node.

A CI runner may talk to any node. A request for a task another node owns, or a task the
leader placed elsewhere, is forwarded over HTTP with the cluster secret; the answer goes
back unchanged. Peers are found in the membership table, by node id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

import attrs
import treq
from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool, RequestNotSent
from twisted.web.http_headers import Headers

if TYPE_CHECKING:
    from oxide_cluster.membership import Membership

FORWARDED_HEADER = b"X-Oxide-Forwarded"
# Headers of a peer's answer that a client needs; hop-by-hop ones are not copied.
_PASSED_HEADERS = (b"content-type", b"retry-after", b"x-next-offset", b"x-task-state",
                   b"allow", b"www-authenticate")


def _writer(target: BinaryIO) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        target.write(data)
    return write


# Failures that prove the request never reached the peer: trying another node is safe.
_NOT_SENT = (ConnectError, ConnectingCancelledError, RequestNotSent)


def _why(error: BaseException, timeout: float) -> str:
    """Why a peer request failed, in words (treq's timeout is a list of Failures)."""
    reasons = getattr(error, "reasons", None) or []
    if isinstance(error, defer.CancelledError) or any(
            reason.check(defer.CancelledError) for reason in reasons):
        return f"did not answer within {timeout:g} s"
    if reasons:
        return "did not answer: " + "; ".join(reason.getErrorMessage() for reason in reasons)
    return f"did not answer: {error}"


class PeerUnavailable(Exception):
    """The peer is unknown, not healthy, or did not answer.

    ``sent`` is False only when the request certainly never reached the peer (unknown
    node, connection refused): after a timeout or a lost reply the peer may have acted
    on it, so a task sent there must not be started anywhere else."""

    def __init__(self, message: str, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


@attrs.frozen
class PeerReply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class PeerClient(service.Service):
    """Keep-alive HTTP to peers, addressed by node id through the membership table; as a
    service, stopping closes its idle connections."""

    log = Logger()

    def __init__(self, reactor: Any, secret: str, membership: Membership,
                 timeout: float = 30.0) -> None:
        self._reactor = reactor
        self._secret = secret.encode()
        self._membership = membership
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 8

    def address_of(self, node_id: str) -> str | None:
        """``http://ip:port`` of a healthy peer, else of a node peers gossip about, or None.

        A node only gossiped about (not heard by us yet, or no longer) is still worth one
        request: a peer hears it now, and a 404 for a task it owns would be wrong.
        """
        membership = self._membership
        peer = membership.get(node_id)
        if peer is not None and peer.healthy and peer.ip_address and peer.api_port:
            return f"http://{peer.ip_address}:{peer.api_port}"
        rumour = membership.rumour(node_id)
        if rumour is not None:
            return f"http://{rumour.ip_address}:{rumour.api_port}"
        return None

    def knows(self, node_id: str) -> bool:
        """Heard of this node (healthy or not, or by gossip): task ids naming it route."""
        membership = self._membership
        return membership.get(node_id) is not None or membership.rumour(node_id) is not None

    async def request(self, node_id: str, method: bytes, path: bytes, body: bytes | None = None,
                      headers: dict[bytes, bytes] | None = None,
                      timeout: float | None = None) -> PeerReply:
        """One request to a peer; raises PeerUnavailable when it cannot be reached."""
        base = self.address_of(node_id)
        if base is None:
            raise PeerUnavailable(f"node {node_id} is not a healthy peer")
        all_headers = Headers({b"X-Cluster-Secret": [self._secret],
                               FORWARDED_HEADER: [b"1"]})
        for name, value in (headers or {}).items():
            all_headers.setRawHeaders(name, [value])
        try:
            response = await treq.request(
                method.decode("ascii"), base.encode("ascii") + path, data=body,
                headers=all_headers, pool=self._pool, reactor=self._reactor,
                timeout=timeout or self._timeout)
            content = await treq.content(response)
        except (defer.CancelledError, Exception) as error:
            raise PeerUnavailable(f"node {node_id} {_why(error, timeout or self._timeout)}",
                                  sent=not isinstance(error, _NOT_SENT)) from None
        passed = {}
        for name in _PASSED_HEADERS:
            value = response.headers.getRawHeaders(name)
            if value:
                passed[name] = value[-1].encode() if isinstance(value[-1], str) else value[-1]
        return PeerReply(response.code, passed, content)

    async def download(self, node_id: str, path: bytes, target: BinaryIO,
                       timeout: float | None = None) -> int:
        """``GET path`` from a peer, its body written to ``target`` as it arrives (a
        blob is never held whole in memory); the status. Raises PeerUnavailable."""
        base = self.address_of(node_id)
        if base is None:
            raise PeerUnavailable(f"node {node_id} is not a healthy peer")
        headers = Headers({b"X-Cluster-Secret": [self._secret], FORWARDED_HEADER: [b"1"]})
        try:
            response = await treq.request(
                "GET", base.encode("ascii") + path, headers=headers, pool=self._pool,
                reactor=self._reactor, timeout=timeout or self._timeout)
            if response.code != 200:
                await treq.content(response)
                return int(response.code)
            await treq.collect(response, _writer(target))
        except (defer.CancelledError, Exception) as error:
            raise PeerUnavailable(f"node {node_id} did not answer: {error}") from None
        return 200

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self._pool.closeCachedConnections()

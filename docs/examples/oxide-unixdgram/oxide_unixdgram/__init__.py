"""A demo discovery transport for oxide-cluster: Unix datagram sockets in one directory.

Every node binds ``<dir>/<discovery_port>.sock``; "the cluster" is every other socket in
the directory. Membership records peers as ``(host, port)``, so socket files map to
``127.0.0.1:<port>`` (the host is also where peers' HTTP goes: one host only).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from oxide_cluster.interfaces import IDiscoveryTransport

Address = tuple[str, int]
HOST = "127.0.0.1"


class _Receiver(DatagramProtocol):
    def __init__(self, deliver: Callable[[bytes, Address], None]) -> None:
        self.deliver = deliver

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        name = Path(os.fsdecode(addr or "")).name
        stem = name.removesuffix(".sock")
        if stem.isdigit():  # anything else is not one of ours
            self.deliver(datagram, (HOST, int(stem)))


@implementer(IDiscoveryTransport)
class UnixDatagramTransport:
    """IDiscoveryTransport over AF_UNIX datagram sockets in ``directory``."""

    def __init__(self, reactor: Any, directory: str, port: int) -> None:
        self.reactor = reactor
        self.directory = Path(directory)
        self.port = port
        self._listening: Any = None

    def _path(self, port: int) -> str:
        return str(self.directory / f"{port}.sock")

    def bind(self, deliver: Callable[[bytes, Address], None]) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(self.port)
        if os.path.exists(path):
            os.unlink(path)  # a node that crashed left it; the port is ours (state dir lock)
        self._listening = self.reactor.listenUNIXDatagram(path, _Receiver(deliver))
        return self.port

    def refresh(self) -> None:
        """The directory is read on every cluster send."""

    def cluster_addresses(self) -> list[Address]:
        ports = [int(p.stem) for p in self.directory.glob("*.sock") if p.stem.isdigit()]
        return [(HOST, port) for port in sorted(ports) if port != self.port]

    def reaches(self, address: Address) -> bool:
        return address[0] == HOST and os.path.exists(self._path(address[1]))

    def send(self, datagram: bytes, address: Address) -> None:
        self._listening.write(datagram, self._path(address[1]))

    def close(self) -> defer.Deferred[None]:
        listening, self._listening = self._listening, None
        if listening is None:
            return defer.succeed(None)
        try:
            os.unlink(self._path(self.port))
        except OSError:
            pass
        return defer.maybeDeferred(listening.stopListening).addCallback(lambda _: None)


def factory(context: Any) -> UnixDatagramTransport:
    """Called by oxide-cluster with its ProviderContext; ``unix_dir`` is our option."""
    return UnixDatagramTransport(context.reactor, context.options["unix_dir"],
                                 context.config.discovery_port)

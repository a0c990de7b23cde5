"""Declares the ``unixdgram`` discovery transport to oxide-cluster (found by getPlugins)."""

from oxide_unixdgram import factory

from oxide_cluster.config import Setting
from oxide_cluster.providers import Provider

unixdgram = Provider(
    kind="discovery_transport",
    name="unixdgram",
    factory=factory,
    description="Unix datagram sockets in one directory (a demo: one host only)",
    options=(Setting("unix_dir", str, "/tmp/oxide-unixdgram",
                     "directory holding one socket per node"),),
)

"""Declares the ``oxide-cluster`` twistd plugin; everything else is in oxide_cluster.tap."""

from twisted.application.service import ServiceMaker

oxide_cluster = ServiceMaker(
    "oxide-cluster",
    "oxide_cluster.tap",
    "A node of an oxide-cluster pool that runs CI commands over HTTP",
    "oxide-cluster",
)

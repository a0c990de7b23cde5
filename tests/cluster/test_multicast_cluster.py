"""Issue 17: the ``multicast`` discovery transport between real agents, one per network
namespace, on a segment whose hosts drop every broadcast (multicast crosses the bridge).

Run alone: ``python -m pytest tests/cluster/test_multicast_cluster.py -s`` (needs root).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import harness
import oxide
from harness import drop_broadcast, poll_until, route_multicast
from oxide import all_see, fully_meshed, healthy_in

GROUP = "239.255.77.17:4002"
ARGS = ("--discovery-transport", "multicast", "--multicast-group", GROUP)


def _no_broadcast_multicast_routed(host: harness.Host) -> harness.Host:
    route_multicast(host)
    drop_broadcast(host)
    return host


def _multicast_cluster(network: Any, tmp_path: Path, hosts: int) -> oxide.Cluster:
    net = network(hosts)
    for host in net.hosts:
        _no_broadcast_multicast_routed(host)
    c = oxide.Cluster(net, tmp_path / f"{net.log_dir.name}-agents", ARGS)
    c.start(net.hosts)
    return c


def _dead(entry: dict[str, Any] | None) -> bool:
    return entry is not None and entry["state"] == "dead" and not entry["healthy"]


def test_hosts_join_by_multicast_without_broadcast_and_a_late_one_is_known(network,
                                                                           tmp_path):
    c = _multicast_cluster(network, tmp_path, 3)
    t0 = time.monotonic()
    c.wait_meshed(timeout=15)
    meshed = time.monotonic() - t0
    for node in c.nodes:
        for entry in node.remote().values():
            assert entry["state"] == "alive" and entry["healthy"], entry
    late = c.node_for(_no_broadcast_multicast_routed(c.net.add_host())).start()
    ready_at = late.wait_ready()
    known_at = poll_until(lambda: fully_meshed(c.nodes) and time.monotonic(), 5,
                          interval=0.02, message="late node not known by all by multicast")
    print(f"\nmulticast join: 3 hosts meshed {meshed:.3f}s after ready; a late host known "
          f"by all {max(0.0, known_at - ready_at):.3f}s after its /ready")
    assert known_at - ready_at <= 1.0


def test_a_crashed_host_is_declared_dead_by_all_within_three_seconds(network, tmp_path):
    c = _multicast_cluster(network, tmp_path, 3)
    c.wait_meshed(timeout=15)
    victim, *survivors = c.nodes
    victim.node_id  # noqa: B018 (read and cache it while it still answers)
    t0 = time.monotonic()
    victim.kill()
    dead_at = poll_until(lambda: all_see(survivors, victim, _dead) and time.monotonic(), 5,
                         interval=0.02, message="killed node not declared dead by all")
    print(f"\nmulticast crash: kill -9 -> dead everywhere {dead_at - t0:.3f}s")
    assert dead_at - t0 <= 3.0
    assert all(healthy_in(s, [o for o in survivors if o is not s]) for s in survivors)

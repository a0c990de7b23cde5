"""Issue 4: UDP discovery between real agents, one per network namespace.

Each scenario prints the figure it measured (run with ``-s`` to see them).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
from harness import UdpSink, clear_faults, drop_udp, poll_until, send_udp
from oxide import DISCOVERY_PORT, all_see, fully_meshed, healthy_in

from oxide_cluster import wire


def _alive(entry: dict[str, Any] | None) -> bool:
    return entry is not None and entry["state"] == "alive" and entry["healthy"]


def _gone(entry: dict[str, Any] | None) -> bool:
    return entry is None or (entry["state"] == "left" and not entry["healthy"])


def _dead(entry: dict[str, Any] | None) -> bool:
    return entry is not None and entry["state"] == "dead" and not entry["healthy"]


def _unhealthy(entry: dict[str, Any] | None) -> bool:
    return entry is not None and not entry["healthy"]


def test_three_hosts_list_each_other_alive_and_healthy(cluster):
    c = cluster(3)
    for node in c.nodes:
        view = node.nodes()
        others = {o.node_id: o for o in c.nodes if o is not node}
        assert view["total_nodes"] == 3 and view["healthy_nodes"] == 3, view
        assert view["local_node"]["ip_address"] == node.host.ip
        assert view["local_node"]["healthy"] is True
        remote = {r["node_id"]: r for r in view["remote_nodes"]}
        assert remote.keys() == others.keys()
        for node_id, entry in remote.items():
            assert _alive(entry), entry
            assert entry["ip_address"] == others[node_id].host.ip
            assert entry["api_port"] == 4000
            assert entry["hostname"]
            assert entry["stats"]["free_slots"] is not None
    print(f"\nsmoke: 3 nodes, each lists 2 healthy peers; node ids {[n.node_id for n in c.nodes]}")


def test_late_host_is_known_by_all_within_one_second_of_ready(cluster):
    c = cluster(3)
    late = c.node_for(c.net.add_host()).start()
    ready_at = late.wait_ready()
    known_at = poll_until(
        lambda: fully_meshed(c.nodes) and time.monotonic(), 5, interval=0.02,
        message="late node not known by all")
    since_ready = max(0.0, known_at - ready_at)
    since_start = known_at - late.started_at
    print(f"\njoin: known by all {since_ready:.3f}s after /ready, "
          f"{since_start:.3f}s after process start (ready took {ready_at - late.started_at:.3f}s)")
    assert since_ready <= 1.0


def test_clean_leave_disappears_from_all_tables_within_half_a_second(cluster):
    c = cluster(3)
    leaving, *stay = c.nodes
    leaving.node_id  # noqa: B018 (read and cache it while it still answers)
    t0 = time.monotonic()
    leaving.agent.proc.signal(signal.SIGTERM)
    gone_at = poll_until(lambda: all_see(stay, leaving, _gone) and time.monotonic(), 2,
                         interval=0.02, message="stopped node still listed as healthy")
    leaving.assert_stopped_cleanly(leaving.agent.proc.wait(10))
    elapsed = gone_at - t0
    print(f"\nleave: SIGTERM -> left everywhere in {elapsed:.3f}s")
    assert elapsed <= 0.5
    for node in stay:
        assert node.remote()[leaving.node_id]["state"] == "left"
        assert node.nodes()["healthy_nodes"] == 2


def test_crashed_host_is_declared_dead_by_all_within_three_seconds(cluster):
    c = cluster(3)
    victim, *survivors = c.nodes
    victim.node_id  # noqa: B018
    t0 = time.monotonic()
    victim.kill()
    unhealthy_at = poll_until(lambda: all_see(survivors, victim, _unhealthy) and
                              time.monotonic(), 5, interval=0.02, message="not unhealthy")
    dead_at = poll_until(lambda: all_see(survivors, victim, _dead) and time.monotonic(), 5,
                         interval=0.02, message="killed node not declared dead by all")
    print(f"\ncrash: kill -9 -> unhealthy everywhere {unhealthy_at - t0:.3f}s, "
          f"dead everywhere {dead_at - t0:.3f}s")
    assert dead_at - t0 <= 3.0
    assert all(healthy_in(s, [o for o in survivors if o is not s]) for s in survivors)


def test_restarted_host_reloads_peers_as_stale_then_rejoins(cluster):
    c = cluster(3)
    node, *others = c.nodes
    node.stop()  # a clean stop saves the peer table
    # Deaf to discovery: whatever the restarted node lists came from its state dir.
    drop_udp(node.host, DISCOVERY_PORT, 100)
    node.start()
    node.wait_ready()
    table = poll_until(lambda: len(node.remote()) == 2 and node.remote(), 5,
                       message="stored peers not reloaded")
    assert {o.node_id for o in others} == table.keys()
    for o in others:
        entry = table[o.node_id]
        assert entry["state"] == "stale" and not entry["healthy"], entry
        assert entry["ip_address"] == o.host.ip
    print(f"\nrestart: reloaded {sorted(e['state'] for e in table.values())} before hearing anyone")
    t0 = time.monotonic()
    clear_faults(node.host)
    poll_until(lambda: fully_meshed(c.nodes), 5, interval=0.05,
               message="restarted node not healthy everywhere")
    print(f"restart: healthy everywhere {time.monotonic() - t0:.3f}s after the network opened")


def _announce_body(node_id: str) -> dict[str, Any]:
    return {
        "node_id": node_id, "hostname": "intruder", "api_port": 4000, "services": ["executor"],
        "labels": {}, "version": "0", "started_at": time.time(),
        "stats": {"cpu_percent": 0.0, "memory_percent": 0.0, "load": [0.0, 0.0, 0.0],
                  "running_tasks": 0, "free_slots": 8},
        "leader": None,
    }


def test_forged_and_replayed_datagrams_change_nothing_and_are_counted(cluster):
    c = cluster(3)
    spy = c.net.add_host()  # a host on the segment with no agent, only a capture socket
    sink = UdpSink(spy, DISCOVERY_PORT)
    before = {n.name: n.discovery_stats()["dropped"] for n in c.nodes}
    ids = {n.node_id for n in c.nodes}

    # 1. A well-formed announce of a new node, signed with the wrong secret.
    wrong_key = wire.derive_key("not-the-cluster-secret")
    forged = wire.encode(wrong_key, wire.ANNOUNCE, "forged-node",
                         _announce_body("forged-node"), ts=time.time())
    send_udp(spy, c.net.broadcast, DISCOVERY_PORT, forged, broadcast=True, count=5)

    # 2. The right key, but a timestamp a minute old (a recording played back late).
    right_key = wire.derive_key(c.nodes[0].secret)
    old = wire.encode(right_key, wire.ANNOUNCE, "old-node", _announce_body("old-node"),
                      ts=time.time() - 60)
    send_udp(spy, c.net.broadcast, DISCOVERY_PORT, old, broadcast=True, count=3)

    # 3. A captured genuine announce from h1, replayed at once: same nonce.
    h1 = c.nodes[0].host.ip
    captured = poll_until(
        lambda: [d for src, d in sink.datagrams() if src == h1 and b'"announce"' in d], 5,
        message="no announce captured")[-1]
    send_udp(spy, c.net.broadcast, DISCOVERY_PORT, captured, broadcast=True, count=3)

    def counted() -> dict[str, dict[str, int]]:
        deltas = {}
        for n in c.nodes:
            now = n.discovery_stats()["dropped"]
            deltas[n.name] = {k: now[k] - before[n.name][k]
                              for k in ("bad_mac", "stale", "replayed")}
        ok = all(d["bad_mac"] >= 5 and d["stale"] >= 3 and d["replayed"] >= 3
                 for d in deltas.values())
        return deltas if ok else {}

    deltas = poll_until(counted, 5, message="forged datagrams not counted")
    print(f"\nforgery: dropped deltas per node {deltas}")
    for n in c.nodes:
        view = n.nodes()
        assert {r["node_id"] for r in view["remote_nodes"]} | {n.node_id} == ids
        assert view["total_nodes"] == 3 and view["healthy_nodes"] == 3
    sink.stop()


@pytest.mark.slow
def test_twenty_percent_loss_declares_no_live_host_dead_over_a_minute(cluster):
    c = cluster(4)
    for node in c.nodes:
        drop_udp(node.host, DISCOVERY_PORT, 20)
    counts = {"samples": 0, "suspect": 0, "not_alive": 0}
    healthy: list[int] = []
    problems: list[str] = []
    duration = 60.0
    end = time.monotonic() + duration

    def sample() -> bool:
        """One round over every node; truthy only once the minute is over."""
        for node in c.nodes:
            try:
                view = node.nodes()
            except Exception as exc:  # a node that cannot answer is a finding, not a retry
                problems.append(f"{node.name} unreachable: {exc!r}")
                continue
            counts["samples"] += 1
            healthy.append(view["healthy_nodes"])
            for entry in view["remote_nodes"]:
                if entry["state"] == "suspect":
                    counts["suspect"] += 1
                elif entry["state"] != "alive":
                    counts["not_alive"] += 1
                    problems.append(f"{node.name} sees {entry['ip_address']} {entry['state']}")
        return time.monotonic() >= end

    # poll_until paces the sampling (~0.2 s per round) and bounds the whole run.
    poll_until(sample, duration + 30, interval=0.2, message="sampling did not finish")
    received = [n.discovery_stats()["received"]["announce"] for n in c.nodes]
    print(f"\nloss 20%: {counts['samples']} samples over {duration:.0f}s, suspect observations "
          f"{counts['suspect']}, not alive {counts['not_alive']}, healthy_nodes min/max "
          f"{min(healthy)}/{max(healthy)}, announces received per node {received}")
    assert not problems, problems[:10]
    assert counts["samples"] >= 4 * 150  # really sampled every node all minute long

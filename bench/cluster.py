"""Cluster costs: the leader's placement decision, and tasks/s through a non-leader node.

    python bench/cluster.py [--calls 10000] [--peers 30] [--tasks 600] [--clients 4]

1. ``Placement.choose()`` over ``--peers`` simulated healthy peers (a fake node whose
   membership returns them), median and p99 over ``--calls`` calls, next to sorting as
   many plain tuples in the same run (the floor any ranking pays).
2. End-to-end tasks/s of ``/bin/true`` with ``POST /execute?wait=30`` from ``--clients``
   keep-alive clients: through a non-leader of a 3-node loopback cluster (static
   ``--peers``, real redis-server: forwarded to the leader, which places the task),
   through the leader, and through one standalone node. Every node has ``--clients``
   slots; 429/503 answers are retried and counted.

Leader failover is measured by ``bench/failover.py``. Bounded: about a minute.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attrs

from bench.common import SECRET, http_rate, print_table, save
from oxide_cluster.membership import Peer, PeerState
from oxide_cluster.placement import Placement
from tests.redis_server import RedisServer
from tests.support import AgentProcess, poll_until

# --------------------------------------------------------------------------- placement


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def seconds(self) -> float:
        return self.now


@attrs.define
class _Membership:
    peers: list[Peer]

    def healthy(self) -> list[Peer]:
        return [p for p in self.peers if p.healthy]


@attrs.define
class _Config:
    labels: dict[str, str]


@attrs.define
class _FakeNode:
    """The few attributes of ``oxide_cluster.node.Node`` that Placement reads."""

    node_id: str
    config: _Config
    membership: _Membership

    def stats(self) -> dict[str, Any]:
        return {"free_slots": 2, "cpu_percent": 35.0, "memory_percent": 40.0}


def fake_peers(count: int, now: float) -> list[Peer]:
    rng = random.Random(5)
    peers = []
    for i in range(count):
        peer = Peer(f"node-{i:03d}", f"10.0.0.{i + 2}", 4001, PeerState.ALIVE,
                    last_heard=now - rng.random() * 0.25, api_port=4000,
                    labels={"zone": f"z{i % 3}"} | ({"gpu": "yes"} if i % 5 == 0 else {}))
        peer.stats = {"free_slots": rng.randint(0, 8), "cpu_percent": rng.random() * 100,
                      "memory_percent": rng.random() * 100, "running_tasks": 0, "load": []}
        peers.append(peer)
    return peers


def _percentiles(ns: list[int]) -> tuple[float, float]:
    ordered = sorted(ns)
    return (statistics.median(ordered) / 1000,
            ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000)


def placement_timing(peers: int, calls: int) -> dict[str, Any]:
    clock = _Clock()
    node = _FakeNode("local", _Config({"zone": "z0"}),
                     _Membership(fake_peers(peers, clock.now)))
    placement = Placement(clock, node)
    for peer in node.membership.peers[::4]:  # recent placements to subtract
        placement.placed(peer.node_id)
    tuples = [(p.stats["free_slots"] <= 0, -p.stats["free_slots"], p.stats["cpu_percent"],
               p.stats["memory_percent"], p.node_id)
              for p in node.membership.peers]
    choose_ns, sort_ns = [], []
    assert len(placement.choose({})) == peers + 1
    for i in range(calls):
        labels = {"gpu": "yes"} if i % 10 == 0 else {}
        started = time.perf_counter_ns()
        placement.choose(labels)
        choose_ns.append(time.perf_counter_ns() - started)
        shuffled = tuples[i % peers:] + tuples[:i % peers]
        started = time.perf_counter_ns()
        sorted(shuffled)
        sort_ns.append(time.perf_counter_ns() - started)
    choose_med, choose_p99 = _percentiles(choose_ns)
    sort_med, sort_p99 = _percentiles(sort_ns)
    return {"peers": peers, "calls": calls, "choose_median_us": choose_med,
            "choose_p99_us": choose_p99, "sort_median_us": sort_med, "sort_p99_us": sort_p99}


# --------------------------------------------------------------------------- end to end


class Cluster:
    """Three agents on loopback with static peers and a real redis-server (``python -m
    bench``'s tasks, latency and cluster_queue sections)."""

    def __init__(self, home: Path, max_tasks: int) -> None:
        self.redis = RedisServer(home / "redis")
        self.nodes = [AgentProcess(home / f"node{i}", secret=SECRET, discovery=True)
                      for i in range(3)]
        for node in self.nodes:
            others = [f"127.0.0.1:{peer.discovery_port}" for peer in self.nodes
                      if peer is not node]
            node.extra_args = ("--peers", ",".join(others), "--max-tasks", str(max_tasks))

    def __enter__(self) -> Cluster:
        self.redis.start()
        for node in self.nodes:
            node.extra_args += ("--redis", self.redis.url)
            node.start()
        for node in self.nodes:
            poll_until(lambda node=node: node.get("/api/cluster/nodes").json()
                       ["healthy_nodes"] == 3, 30, message=f"{node.name} to see all three")
        poll_until(lambda: len({n.get("/api/cluster/leader").json()["node_id"]
                                for n in self.nodes} - {None}) == 1, 30, message="a leader")
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            node.terminate()
        self.redis.stop()

    def leader(self) -> AgentProcess:
        leader = self.nodes[0].get("/api/cluster/leader").json()["node_id"]
        return next(n for n in self.nodes if node_id(n) == leader)

    def non_leader(self) -> AgentProcess:
        leader = self.nodes[0].get("/api/cluster/leader").json()["node_id"]
        return next(n for n in self.nodes if n.get("/health").json()["node_id"] != leader)


def node_id(agent: AgentProcess) -> str:
    return (agent.state_dir / "node_id").read_text().strip()


def cluster_rates(home: Path, tasks: int, clients: int) -> dict[str, Any]:
    redis = RedisServer(home / "redis")
    redis.start()
    agents = [AgentProcess(home / f"node{i}", secret=SECRET, discovery=True) for i in range(3)]
    for agent in agents:
        others = [f"127.0.0.1:{p.discovery_port}" for p in agents if p is not agent]
        agent.extra_args = ("--peers", ",".join(others), "--redis", redis.url,
                            "--max-tasks", str(clients))
    standalone = AgentProcess(home / "standalone", secret=SECRET,
                              extra_args=("--max-tasks", str(clients)))
    results: dict[str, Any] = {}
    try:
        for agent in [*agents, standalone]:
            agent.start(wait=False)
        for agent in [*agents, standalone]:
            agent.wait_ready(30)
        for agent in agents:
            poll_until(lambda a=agent: a.get("/api/cluster/nodes").json()["healthy_nodes"] == 3,
                       20, message=f"{agent.name} to see all three")
        leader_id = poll_until(
            lambda: (lambda ids: ids.pop() if len(ids) == 1 and None not in ids else None)(
                {a.get("/api/cluster/leader").json()["node_id"] for a in agents}),
            20, message="one leader")
        leader = next(a for a in agents if node_id(a) == leader_id)
        follower = next(a for a in agents if a is not leader)
        names = {node_id(a): a.name for a in [*agents, standalone]}
        for label, target in (("through a non-leader (3 nodes + redis)", follower),
                              ("through the leader (3 nodes + redis)", leader),
                              ("one standalone node", standalone)):
            http_rate(target.port, max(20, tasks // 10), clients)  # warm up
            rate, refused, where = http_rate(target.port, tasks, clients)
            results[label] = {"tasks_per_s": rate, "refused": refused,
                              "ran_on": {names.get(k, k): v for k, v in where.items()}}
            print(f"{label}: {rate:.0f} tasks/s, ran on {results[label]['ran_on']}",
                  flush=True)
    finally:
        for agent in [*agents, standalone]:
            agent.terminate()
        redis.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--peers", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--clients", type=int, default=4)
    options = parser.parse_args()
    began = time.monotonic()

    place = placement_timing(options.peers, options.calls)
    home = Path(tempfile.mkdtemp(prefix="oxide-bench-cluster-"))
    rates = cluster_rates(home, options.tasks, options.clients)

    rows = [
        [f"Placement.choose(), {options.peers} peers", f"{place['choose_median_us']:.1f} us",
         f"{place['choose_p99_us']:.1f} us", f"{options.calls} calls"],
        [f"sorted() of {options.peers} tuples (baseline)", f"{place['sort_median_us']:.1f} us",
         f"{place['sort_p99_us']:.1f} us",
         f"choose = {place['choose_median_us'] / place['sort_median_us']:.0f}x sort"],
    ]
    base = rates["one standalone node"]["tasks_per_s"]
    for label, figures in rates.items():
        rows.append([f"/bin/true ?wait, {label}", f"{figures['tasks_per_s']:.0f} tasks/s", "",
                     f"{figures['tasks_per_s'] / base:.2f} x standalone, "
                     f"{figures['refused']} refusals retried"])
    print_table(f"Cluster costs ({options.tasks} tasks, {options.clients} clients per path)",
                ["what", "median / rate", "p99", "note"], rows)
    path = save("cluster", {"placement": place, "tasks": options.tasks,
                            "clients": options.clients, "rates": rates,
                            "seconds": time.monotonic() - began})
    print(f"results: {path} ({time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()

"""The cluster queue: many ``/bin/true`` submitted at once to 3 nodes x 2 slots with Redis.

    python -m bench.cluster_queue [--tasks 10000] [--fair 1000] [--depth 100000]
                                  [--probes 200] [--clients 16] [--fill-budget 110]

Three agents on loopback (static peers, a real redis-server, ``--max-tasks 2`` each:
``bench.cluster.Cluster``). Baseline, same cluster, same run: its HTTP rate through a
non-leader with one client per slot (each client waits for its task, nothing queues).

1. Drain: every slot is held by a task pinned to its node that waits for a file; ``--tasks``
   tasks (priorities 0..2 in turn) are submitted through all three nodes at once
   (``--clients`` keep-alive threads, round robin over the nodes) so all of them queue
   in Redis; the file is created and the cluster drains. Reported: drain rate (tasks /
   (last end - release)), queue wait (``started_at - created_at``) p50/p99, the agents'
   peak RSS (largest of the three) next to their RSS before, priority inversions
   (``bench.queue.inversions``).
2. Fair share: a group of ``--fair`` then a group of 10, one priority, the same way: the
   start index (0-based, all tasks of the round by ``started_at``) of the small group's
   last task next to the big group's 50th.
3. Submit latency with the queue deep: slots held, the queue is filled to 100 and
   ``--probes`` submits are timed one at a time, then filled to ``--depth`` (or as far as
   ``--fill-budget`` seconds of submitting get: the depth reached is reported) and timed
   again. The ratio of the two p99s is shown next to log(depth)/log(100), the growth
   O(log n) allows. The cluster is stopped afterwards (the queue is not drained).
"""

from __future__ import annotations

import argparse
import math
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.cluster import Cluster, node_id
from bench.common import Client, http_rate, print_table, save
from bench.load import parse_rfc3339, percentile
from bench.queue import all_tasks, inversions, submit_spread
from tests.support import AgentProcess, poll_until

SLOTS = 2


def rss(nodes: list[AgentProcess]) -> list[int]:
    return [psutil.Process(node.pid).memory_info().rss for node in nodes]


def hold_slots(cluster: Cluster, gate: Path) -> None:
    """Every slot of every node runs a task (pinned to it) that waits for ``gate``."""
    hold = f"while [ ! -e {gate} ]; do sleep 0.02; done"
    entry = Client(cluster.nodes[0].port)
    for node in cluster.nodes:
        for _ in range(SLOTS):
            status, answer = entry.call("POST", "/execute", {
                "command": "sh", "args": ["-c", hold], "node": node_id(node),
                "group": "hold"})
            assert status in (200, 202), (status, answer)
    for node in cluster.nodes:
        poll_until(lambda node=node: node.get("/stats").json()["running"] == SLOTS, 30,
                   message=f"{node.name} to run {SLOTS} holding tasks")


def queued(cluster: Cluster) -> int:
    """Tasks queued in Redis, read from Redis itself (``ZCARD``): ``GET /queue`` orders
    up to 10,000 records per call, and polling it would load the node it asks."""
    with socket.create_connection(("127.0.0.1", cluster.redis.port), timeout=10) as conn:
        conn.sendall(b"ZCARD oxide:oxide:queue\r\n")
        reply = conn.recv(64)
    assert reply.startswith(b":"), reply
    return int(reply[1:].split(b"\r\n", 1)[0])


def drain(cluster: Cluster, deadline: float) -> list[int]:
    """Wait until nothing is queued in Redis nor running anywhere; peak RSS per node."""
    peak = rss(cluster.nodes)
    while time.monotonic() < deadline:
        peak = [max(a, b) for a, b in zip(peak, rss(cluster.nodes), strict=True)]
        if queued(cluster) == 0 and all(node.get("/stats").json()["running"] == 0
                                        for node in cluster.nodes):
            return peak
        time.sleep(0.2)
    raise RuntimeError("the cluster queue did not drain in time")


def run_queued(cluster: Cluster, bodies: list[dict[str, Any]], clients: int, gate: Path
               ) -> tuple[list[dict[str, Any]], float, list[int]]:
    """Hold every slot, submit ``bodies`` (they all queue), let go, drain: (the tasks as
    they ended, release time, peak RSS per node)."""
    hold_slots(cluster, gate)
    _, answers = submit_spread([n.port for n in cluster.nodes], bodies, clients)
    assert all(answer["state"] == "queued" for answer in answers), "a task did not queue"
    poll_until(lambda: queued(cluster) == len(bodies), 60, 0.2, message="all in Redis")
    peak = rss(cluster.nodes)
    released = time.time()
    gate.touch()
    peak = [max(a, b) for a, b in zip(peak, drain(cluster, time.monotonic() + 900),
                                      strict=True)]
    gate.unlink()
    ids = {answer["id"] for answer in answers}
    tasks = [t for node in cluster.nodes for t in all_tasks(node.port) if t["id"] in ids]
    assert len(tasks) == len(bodies) and {t["state"] for t in tasks} == {"succeeded"}, \
        (len(tasks), {t["state"] for t in tasks})
    return tasks, released, peak


def probe_latency(port: int, probes: int) -> list[float]:
    """``probes`` submits one after another (each queues): their latencies."""
    latencies, _ = submit_spread([port], [{"command": "/bin/true"}] * probes, 1)
    return latencies


def fill_to(cluster: Cluster, depth: int, clients: int, budget: float) -> int:
    """Submit until ``depth`` tasks are queued or ``budget`` seconds passed; the depth."""
    missing = depth - queued(cluster)
    if missing > 0:
        submit_spread([n.port for n in cluster.nodes], [{"command": "/bin/true"}] * missing,
                      clients, budget)
    return queued(cluster)


def measure(cluster: Cluster, tasks: int, fair: int, depth: int, probes: int, clients: int,
            fill_budget: float, gate: Path) -> dict[str, Any]:
    entry = cluster.non_leader()
    http_rate(entry.port, 30, 3 * SLOTS)  # warm up
    baseline, _, _ = http_rate(entry.port, min(tasks, 600), 3 * SLOTS)
    rss_before = rss(cluster.nodes)
    # 1. drain, priorities
    bodies = [{"command": "/bin/true", "priority": i % 3, "group": "one"}
              for i in range(tasks)]
    done, released, peak = run_queued(cluster, bodies, clients, gate)
    created = [parse_rfc3339(t["created_at"]) for t in done]
    started = [parse_rfc3339(t["started_at"]) for t in done]
    finished = [parse_rfc3339(t["finished_at"]) for t in done]
    waits = [s - c for s, c in zip(started, created, strict=True)]
    drain_per_s = len(done) / (max(finished) - released)
    # 2. fair share
    shared = [{"command": "/bin/true", "group": "big"} for _ in range(fair)]
    shared += [{"command": "/bin/true", "group": "small"} for _ in range(10)]
    fair_done, _, _ = run_queued(cluster, shared, clients, gate)
    order = sorted(fair_done, key=lambda t: (parse_rfc3339(t["started_at"]), t["id"]))
    small_last = max(i for i, t in enumerate(order) if t["group"] == "small")
    big_50th = [i for i, t in enumerate(order) if t["group"] == "big"][49]
    # 3. submit latency with the queue at 100, then deep
    hold_slots(cluster, gate)
    shallow_depth = fill_to(cluster, 100, clients, fill_budget)
    shallow = probe_latency(entry.port, probes)
    fill_started = time.monotonic()
    deep_depth = fill_to(cluster, depth, clients, fill_budget)
    fill_s = time.monotonic() - fill_started
    deep = probe_latency(entry.port, probes)
    deep_rss = rss(cluster.nodes)
    shallow_p99, deep_p99 = percentile(shallow, 0.99), percentile(deep, 0.99)
    return {
        "slots": 3 * SLOTS, "tasks": len(done), "baseline_per_s": baseline,
        "drain_per_s": drain_per_s,
        "wait_p50_s": percentile(waits, 0.5), "wait_p99_s": percentile(waits, 0.99),
        "drain_time_s": len(done) / drain_per_s,
        "rss_before_mb": max(rss_before) / 2**20, "rss_peak_mb": max(peak) / 2**20,
        "rss_peak_by_node_mb": [r / 2**20 for r in peak],
        "priority_inversions": inversions(done),
        "fair_groups": (fair, 10), "small_last_index": small_last, "big_50th_index": big_50th,
        "small_last_before_big_50th": small_last < big_50th,
        "shallow_depth": shallow_depth, "deep_depth": deep_depth, "deep_target": depth,
        "fill_s": fill_s, "fill_per_s": (deep_depth - shallow_depth - probes) / fill_s,
        "submit_shallow_p50_ms": percentile(shallow, 0.5) * 1000,
        "submit_shallow_p99_ms": shallow_p99 * 1000,
        "submit_deep_p50_ms": percentile(deep, 0.5) * 1000,
        "submit_deep_p99_ms": deep_p99 * 1000,
        "submit_p99_ratio": deep_p99 / shallow_p99,
        "log_ratio": math.log(max(deep_depth, 2)) / math.log(max(shallow_depth, 2)),
        "rss_deep_mb": max(deep_rss) / 2**20,
    }


def rows(figures: dict[str, Any]) -> list[list[str]]:
    """Rows (section, measure, value, baseline, baseline value, ratio, goal)."""
    slots, n = figures["slots"], figures["tasks"]
    fair, _ = figures["fair_groups"]
    depth = figures["deep_depth"]
    short = "" if depth >= figures["deep_target"] else \
        f" (of {figures['deep_target']}: filling stopped at the time budget)"
    return [
        ["cluster queue", f"drain, {n} queued at once, 3 nodes x 2 slots",
         f"{figures['drain_per_s']:.0f}/s", f"3 nodes ?wait, {slots} clients",
         f"{figures['baseline_per_s']:.0f}/s",
         f"{figures['drain_per_s'] / figures['baseline_per_s']:.2f}", "-"],
        ["cluster queue", "queue wait p50 / p99",
         f"{figures['wait_p50_s']:.2f}/{figures['wait_p99_s']:.2f} s",
         "drain time (tasks / rate)", f"{figures['drain_time_s']:.2f} s",
         f"{figures['wait_p99_s'] / figures['drain_time_s']:.2f}", "<= 1"],
        ["cluster queue", f"agent RSS peak (largest of 3), {n} queued",
         f"{figures['rss_peak_mb']:.0f} MB", "before", f"{figures['rss_before_mb']:.0f} MB",
         f"+{figures['rss_peak_mb'] - figures['rss_before_mb']:.0f} MB", "-"],
        ["cluster queue", "priority inversions (pairs)", str(figures["priority_inversions"]),
         "-", "-", "-", "0"],
        ["cluster queue", f"groups {fair}+10: start index of small's last",
         str(figures["small_last_index"]), "big's 50th", str(figures["big_50th_index"]), "-",
         "small < big"],
        ["cluster queue", f"submit p99, {figures['shallow_depth']} queued",
         f"{figures['submit_shallow_p99_ms']:.1f} ms"],
        ["cluster queue", f"submit p99, {depth} queued{short}",
         f"{figures['submit_deep_p99_ms']:.1f} ms", f"{figures['shallow_depth']} queued",
         f"{figures['submit_shallow_p99_ms']:.1f} ms", f"{figures['submit_p99_ratio']:.2f}",
         f"<= {figures['log_ratio']:.2f} (log ratio)"],
        ["cluster queue", f"agent RSS, {depth} queued", f"{figures['rss_deep_mb']:.0f} MB",
         "before", f"{figures['rss_before_mb']:.0f} MB",
         f"+{figures['rss_deep_mb'] - figures['rss_before_mb']:.0f} MB", "-"],
    ]


def run(home: Path, tasks: int, fair: int, depth: int, probes: int, clients: int,
        fill_budget: float) -> dict[str, Any]:
    """Start the cluster, measure, stop it."""
    with Cluster(home / "cluster", SLOTS) as cluster:
        gate = home / "gate"
        return measure(cluster, tasks, fair, depth, probes, clients, fill_budget, gate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--fair", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=100_000)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--fill-budget", type=float, default=110.0)
    options = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="oxide-bench-cqueue-"))
    figures = run(home, options.tasks, options.fair, options.depth, options.probes,
                  options.clients, options.fill_budget)
    print_table("cluster queue: 3 nodes x 2 slots, Redis",
                ["section", "measure", "oxide", "baseline", "baseline value", "ratio", "goal"],
                [row + ["-"] * (7 - len(row)) for row in rows(figures)])
    print(f"saved {save('cluster-queue', figures)}")


if __name__ == "__main__":
    main()

"""Discovery benchmark: join time and crash-detection time of real agents in namespaces.

For each cluster size N, start N-1 agents (one per network namespace) and wait until
they all list each other; then, per run:

- join: start one more agent and time (a) process start -> known as alive by every other
  node and knowing all of them, (b) its first 200 on ``/ready`` -> the same;
- crash: ``kill -9`` the oldest live agent and time until every survivor lists it dead;
- RSS of every live agent.

Times come from polling ``/api/cluster/nodes`` of every observer (a few threads, each
observer until it agrees), so a figure is an upper bound, late by at most one poll round;
the round time is recorded too. Needs root (network namespaces). Usage::

    python bench/discovery.py [--sizes 3,10,30] [--runs 3] [--budget 540]

prints a table and writes ``bench/results/discovery-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "cluster")]

import harness  # noqa: E402
from oxide import Cluster, OxideNode, fully_meshed  # noqa: E402

Accept = Callable[[dict[str, Any] | None], bool]


def watch(observers: list[OxideNode], check: Callable[[OxideNode], bool], t0: float,
          timeout: float, pool: ThreadPoolExecutor) -> dict[str, Any]:
    """Poll every observer until ``check`` holds on each; seconds since ``t0`` per observer."""
    seen: dict[str, float] = {}
    rounds: list[float] = []
    pending = list(observers)
    deadline = t0 + timeout

    def probe(node: OxideNode) -> tuple[OxideNode, float | None]:
        try:
            return node, (time.monotonic() if check(node) else None)
        except (AssertionError, harness.NodeUnreachable, KeyError):
            return node, None

    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} observers still disagree after {timeout}s: "
                               f"{[n.name for n in pending]}")
        start = time.monotonic()
        for node, at in pool.map(probe, pending):
            if at is not None:
                seen[node.name] = at - t0
        pending = [n for n in pending if n.name not in seen]
        rounds.append(time.monotonic() - start)
    return {"all": max(seen.values()), "per_observer": seen,
            "round_median": statistics.median(rounds), "rounds": len(rounds)}


def entry_state(target: OxideNode, states: tuple[str, ...]) -> Callable[[OxideNode], bool]:
    def check(observer: OxideNode) -> bool:
        entry = observer.remote().get(target.node_id)
        return entry is not None and entry["state"] in states
    return check


def rss_mb(nodes: list[OxideNode]) -> list[float]:
    out = []
    for node in nodes:
        try:
            out.append(psutil.Process(node.agent.pid).memory_info().rss / 2**20)
        except psutil.Error:
            pass
    return out


def bench_size(n: int, runs: int, work: Path, pool: ThreadPoolExecutor) -> dict[str, Any]:
    result: dict[str, Any] = {"n": n, "runs": []}
    with harness.Network("oxb", n - 1, work / f"n{n}-logs") as net:
        cluster = Cluster(net, work / f"n{n}-agents")
        t0 = time.monotonic()
        cluster.start(net.hosts, timeout=300)
        result["start_others_s"] = time.monotonic() - t0
        harness.poll_until(lambda: fully_meshed(cluster.live()), 120, interval=0.5,
                           message=f"{n - 1} agents never meshed")
        result["mesh_others_s"] = time.monotonic() - t0
        for run in range(runs):
            others = cluster.live()
            late = cluster.node_for(net.add_host())
            late.start()
            ready_at = late.wait_ready(120)
            late.node_id  # noqa: B018 (read once, before the polling threads)
            others_ids = {x.node_id for x in others}

            def knows(o: OxideNode, late: OxideNode = late, ids: set[str] = others_ids
                      ) -> bool:
                table = o.remote()
                wanted = ids if o is late else {late.node_id}
                return all(table.get(i, {}).get("state") == "alive" for i in wanted)

            joined = watch([*others, late], knows, late.started_at, 60, pool)
            victim = others[0]
            victim_id = victim.node_id
            survivors = [x for x in cluster.live() if x is not victim]
            t_kill = time.monotonic()
            victim.kill()
            dead = watch(survivors, entry_state(victim, ("dead",)), t_kill, 30, pool)
            rss = rss_mb(cluster.live())
            record = {
                "run": run + 1,
                "join_from_start_s": joined["all"],
                "join_from_ready_s": max(0.0, late.started_at + joined["all"] - ready_at),
                "ready_s": ready_at - late.started_at,
                "join_poll_round_s": joined["round_median"],
                "crash_detect_s": dead["all"],
                "crash_poll_round_s": dead["round_median"],
                "crash_per_observer_s": dead["per_observer"],
                "victim": victim_id,
                "rss_mb_median": statistics.median(rss),
                "rss_mb_max": max(rss),
                "live_agents": len(rss),
            }
            result["runs"].append(record)
            print(f"  N={n} run {run + 1}: join {record['join_from_start_s']:.3f}s from start"
                  f" ({record['join_from_ready_s']:.3f}s from ready), crash detected"
                  f" {record['crash_detect_s']:.3f}s, RSS median {record['rss_mb_median']:.1f}"
                  f" MB", flush=True)
    for key in ("join_from_start_s", "join_from_ready_s", "crash_detect_s", "rss_mb_median",
                "join_poll_round_s", "crash_poll_round_s"):
        result[f"median_{key}"] = statistics.median(r[key] for r in result["runs"])
    return result


ARP_LIMIT = Path("/proc/sys/net/ipv4/neigh/default/gc_thresh3")


def arp_entries_needed(n: int) -> int:
    """Every namespace learns every other's MAC, plus the root namespace (the poller).

    The kernel's ARP table is shared by all namespaces: past ``gc_thresh3`` entries
    new neighbours cannot be resolved and hosts go silent (``neighbor table overflow``).
    Real machines each have their own table; this limit is the test box's, not the agent's.
    """
    return n * (n + 1)


def _stop_on_sigterm() -> None:
    """SIGTERM (e.g. from ``timeout``) unwinds like Ctrl-C, so namespaces are torn down."""
    def raise_exit(signum: int, frame: Any) -> None:
        raise SystemExit(f"signal {signum}")
    signal.signal(signal.SIGTERM, raise_exit)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,10,30")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds; sizes not started by then are skipped")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--raise-arp-limit", action="store_true",
                        help="raise the shared ARP table limit (gc_thresh3) for sizes over"
                             " ~30 and restore it afterwards")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/discovery.py needs root (network namespaces)", file=sys.stderr)
        return 2
    _stop_on_sigterm()
    harness.cleanup_stale()
    arp_limit = int(ARP_LIMIT.read_text())
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.monotonic()
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "cpus": os.cpu_count(), "runs": args.runs, "sizes": [],
                              "skipped": [], "failed": {}}
    with tempfile.TemporaryDirectory(prefix="oxide-bench-") as tmp, \
            ThreadPoolExecutor(max_workers=4) as pool:
        for n in sizes:
            if time.monotonic() - started > args.budget:
                report["skipped"].append(n)
                continue
            need = arp_entries_needed(n)
            if need > arp_limit and not args.raise_arp_limit:
                report["failed"][str(n)] = (f"needs ~{need} ARP entries > gc_thresh3 "
                                            f"{arp_limit} (try --raise-arp-limit)")
                continue
            print(f"N={n}: starting {n - 1} agents", flush=True)
            try:
                if need > arp_limit:
                    ARP_LIMIT.write_text(str(need))
                report["sizes"].append(bench_size(n, args.runs, Path(tmp), pool))
            except (TimeoutError, AssertionError, harness.HarnessError) as exc:
                report["failed"][str(n)] = repr(exc)[:2000]
                print(f"N={n} failed: {exc!r}"[:2000], flush=True)
            finally:
                ARP_LIMIT.write_text(str(arp_limit))
    report["total_s"] = time.monotonic() - started

    print(f"\n{'N':>4} {'join (start)':>13} {'join (ready)':>13} {'crash detect':>13} "
          f"{'agent RSS':>10}   medians over {args.runs} runs")
    for size in report["sizes"]:
        print(f"{size['n']:>4} {size['median_join_from_start_s']:>12.3f}s "
              f"{size['median_join_from_ready_s']:>12.3f}s "
              f"{size['median_crash_detect_s']:>12.3f}s "
              f"{size['median_rss_mb_median']:>7.1f} MB")
    for n in report["skipped"]:
        print(f"{n:>4} skipped (time budget)")
    for n, why in report["failed"].items():
        print(f"{n:>4} failed: {why[:200]}")
    out = args.out or ROOT / "bench" / "results" / \
        f"discovery-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {out} (total {report['total_s']:.0f}s)")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

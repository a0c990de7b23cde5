"""The benchmark suite: every figure next to a baseline measured in the same run.

    python -m bench [--quick] [--sections tasks,latency,queue,cluster_queue,stream,
                               workspace,discovery,failover,idle,fanout,escape,
                               retention]
                    [--skip SECTIONS] [--tasks 600] [--clients 8]

Sections:

* ``tasks``: tasks/s of ``/bin/true`` end to end over HTTP (``POST /execute?wait``,
  keep-alive, ``--clients`` threads) through one node and through a 3-node cluster
  (static peers, real redis-server, submitted on a non-leader), against raw spawn
  (``subprocess.run``) and Celery + Redis (worker ``--concurrency 2 --pool prefork``,
  same number of client threads). Rounds are interleaved; medians are shown.
* ``latency``: submit-to-start and end-to-finish p50/p99 at fixed offered loads, open
  loop, against Celery at the same loads.
* ``queue``: 2,000 ``/bin/true`` queued at once on a 2-slot standalone node (``bench.queue``):
  drain rate next to the same node's HTTP rate, queue wait p50/p99, submit p99 while the
  queue fills, RSS, priority inversions, fair share between groups of 1,000 and 10.
* ``cluster_queue``: 10,000 ``/bin/true`` queued at once in Redis on 3 nodes x 2 slots,
  submitted through all three (``bench.cluster_queue``): drain rate next to the same
  cluster's HTTP rate, queue wait p50/p99, agents' RSS, priority inversions, fair share
  (start index of a group of 10's last task next to a group of 1,000's 50th), submit p99
  with 100 and with 100,000 queued (or as deep as 110 s of submitting gets).
* ``stream``: line latency and throughput of live output over ``/ws`` against a plain
  pipe, and the agent's RSS and CPU while it streams.
* ``workspace``: a 5,000-file / 100 MB tree sent by content and run (``true``), first
  and after one changed file, against ``tar | HTTP POST`` of the same tree (to a sink that
  stores it, and one that unpacks it), and artifact download against reading the same
  bytes as output (``bench.workspace``).
* ``discovery``: join and crash detection at N=3 in network namespaces (root only).
* ``failover``: leader failover after ``kill -9`` and after a clean stop.
* ``fanout``: a real suite (more-itertools' tests, run by pytest) locally in one
  process, with ``pytest -n 2``, and through 3 local nodes with ``run --parallel 3
  --split`` (by size, then by the recorded durations) and ``--queue-split``
  (``bench.fanout``); every run must report the same number of tests.
* ``idle``: agent RSS and CPU with 30 peers (29 simulated announcers) against a
  standalone agent, both measured over the same window.
* ``escape``: cancel of 1,000 task trees (200 with ``--quick``) that escape with ``setsid``
  and a double fork, 100 at a time: time, and escaped processes left (goal 0), against
  the same with ``--cgroups off`` (``bench.escape``).
* ``retention``: store size and prune time after 100,000 finished tasks (10,000 with
  ``--quick``) with 4 KiB of output each, pruned by a real agent at start, and the task
  API's p50/p99 while the prune runs against after it (``bench.retention``).

Prints one table and writes ``bench/results/bench-<time>.json``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench import celery_bench
from bench.announcers import Announcers
from bench.cluster import Cluster
from bench.common import (
    SECRET,
    Client,
    LocalAgent,
    http_rate,
    print_table,
    raw_spawn_rate,
    run_true,
    save,
)
from bench.load import closed_loop, open_loop, parse_rfc3339, percentile
from tests.redis_server import RedisServer
from tests.support import AgentProcess, poll_until

SECTIONS = ("tasks", "latency", "queue", "cluster_queue", "stream", "workspace", "discovery",
            "failover", "idle", "fanout", "escape", "retention")
MB = 1024 * 1024


class Report:
    """Rows of the one table plus the raw figures for the JSON file."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.data: dict[str, Any] = {}
        self.notes: list[str] = []

    def row(self, section: str, measure: str, value: str, baseline: str = "-",
            base_value: str = "-", ratio: str = "-", goal: str = "-") -> None:
        self.rows.append([section, measure, value, baseline, base_value, ratio, goal])


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb":
            round(psutil.virtual_memory().total / 2**30, 1), "kernel": platform.release(),
            "python": platform.python_version()}


# -- the systems under test ---------------------------------------------------------------

def http_task_call(port: int, refused: list[int]) -> Callable[[], Any]:
    """One keep-alive connection; a call runs /bin/true to the end (retrying refusals)."""
    client = Client(port)

    def call() -> dict[str, Any]:
        body, retried = run_true(client, pause=0.001)
        refused[0] += retried
        return body
    return call


# -- sections -----------------------------------------------------------------------------

def section_tasks(report: Report, rigs: dict[str, Any], opts: argparse.Namespace) -> None:
    single, cluster, celery = rigs["single"], rigs["cluster"], rigs["celery"]
    entry = cluster.non_leader()
    refused = [0]
    runs: dict[str, list[float]] = {"raw": [], "single": [], "cluster": [], "celery": []}
    measure = {
        "raw": lambda: raw_spawn_rate(opts.tasks),
        "single": lambda: closed_loop(opts.tasks, opts.clients,
                                      lambda: http_task_call(single.port, refused)),
        "cluster": lambda: closed_loop(opts.tasks, opts.clients,
                                       lambda: http_task_call(entry.port, refused)),
        "celery": lambda: celery.client("throughput", opts.tasks, opts.clients)["per_s"],
    }
    closed_loop(50, opts.clients, lambda: http_task_call(single.port, refused))  # warm up
    closed_loop(50, opts.clients, lambda: http_task_call(entry.port, refused))
    for round_ in range(opts.rounds):
        order = list(measure) if round_ % 2 == 0 else list(reversed(measure))
        for name in order:
            runs[name].append(measure[name]())
        print(f"  tasks round {round_ + 1}: "
              + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in runs.items()), flush=True)
    med = {name: statistics.median(values) for name, values in runs.items()}
    report.data["tasks"] = {"runs": runs, "median": med, "tasks": opts.tasks,
                            "clients": opts.clients, "refused_retried": refused[0]}
    what = f"tasks/s, {opts.tasks} x /bin/true, {opts.clients} clients"
    report.row("tasks", "raw subprocess.run, 1 thread", f"{med['raw']:.0f}/s")
    report.row("tasks", "Celery+Redis, prefork x2", f"{med['celery']:.0f}/s")
    for name, label in (("single", "oxide 1 node, HTTP ?wait"),
                        ("cluster", "oxide 3 nodes, via non-leader")):
        report.row("tasks", label, f"{med[name]:.0f}/s", "raw spawn", f"{med['raw']:.0f}/s",
                   f"{med[name] / med['raw']:.2f}", ">= 0.5")
        report.row("tasks", label, f"{med[name]:.0f}/s", "Celery", f"{med['celery']:.0f}/s",
                   f"{med[name] / med['celery']:.2f}", ">= 1.5")
    report.notes.append(f"tasks: {what}; median of {opts.rounds} interleaved rounds; "
                        f"{refused[0]} capacity refusals retried")


def oxide_latency_call(port: int) -> Callable[[float], tuple[float, float]]:
    client = Client(port)

    def call(scheduled: float) -> tuple[float, float]:
        # A refusal (all slots busy) is retried: the wait counts, from the scheduled time.
        body, _ = run_true(client, pause=0.002)
        received = time.time()
        return (parse_rfc3339(body["started_at"]) - scheduled,
                received - parse_rfc3339(body["finished_at"]))
    return call


def section_latency(report: Report, rigs: dict[str, Any], opts: argparse.Namespace) -> None:
    single, cluster, celery = rigs["single"], rigs["cluster"], rigs["celery"]
    entry = cluster.non_leader()
    data: dict[str, Any] = {}
    for rate in opts.rates:
        figures: dict[str, dict[str, list[float]]] = {}
        for name in ("single", "cluster", "celery"):
            if name == "celery":
                figures[name] = celery.client("latency", rate, opts.duration)
                continue
            port = single.port if name == "single" else entry.port
            samples = open_loop(rate, opts.duration, lambda port=port: oxide_latency_call(port))
            figures[name] = {"start": [s for s, _ in samples], "finish": [f for _, f in samples]}
        data[str(rate)] = figures
        for kind, label in (("start", "submit->start"), ("finish", "end->finish")):
            for q in (0.5, 0.99):
                base = percentile(figures["celery"][kind], q) * 1000
                for name, who in (("single", "1 node"), ("cluster", "3 nodes")):
                    value = percentile(figures[name][kind], q) * 1000
                    report.row("latency", f"{label} p{int(q * 100)} @{rate}/s, {who}",
                               f"{value:.1f} ms", "Celery", f"{base:.1f} ms",
                               f"{value / base:.2f}" if base > 0 else "-")
    report.data["latency"] = {"duration_s": opts.duration, "seconds": data}
    report.notes.append(f"latency: open loop for {opts.duration:.0f} s per load, timed from "
                        "the scheduled submit; task timestamps have 1 ms resolution")


def section_queue(report: Report, opts: argparse.Namespace, home: Path) -> None:
    from bench import queue

    count = 500 if opts.quick else 2000
    with LocalAgent("--max-tasks", "2") as agent:
        http_rate(agent.port, 50, 2)  # warm up
        baseline, _, _ = http_rate(agent.port, min(count, 600), 2)
        figures = queue.measure(agent.port, agent.pid, count, 2, 16, home / "queue-gate")
    report.data["queue"] = {"baseline_per_s": baseline, **figures}
    report.row("queue", f"drain, {count} queued at once, 2 slots",
               f"{figures['drain_per_s']:.0f}/s", "1 node HTTP ?wait", f"{baseline:.0f}/s",
               f"{figures['drain_per_s'] / baseline:.2f}")
    report.row("queue", "queue wait p50 / p99",
               f"{figures['wait_p50_s']:.2f}/{figures['wait_p99_s']:.2f} s")
    report.row("queue", "submit p99 while filling", f"{figures['submit_p99_ms']:.1f} ms")
    report.row("queue", "RSS with the queue full", f"{figures['rss_mb']:.0f} MB")
    report.row("queue", "priority inversions", str(figures["priority_inversions"]),
               goal="0")
    report.row("queue", f"groups {figures['fair_groups'][0]}+10: small done first",
               str(figures["small_last_start_before_big_50th"]), goal="True")


def section_cluster_queue(report: Report, opts: argparse.Namespace, home: Path) -> None:
    from bench import cluster_queue

    if opts.quick:
        sizes = {"tasks": 300, "fair": 100, "depth": 1000, "probes": 50, "fill_budget": 60.0}
    else:
        sizes = {"tasks": 10_000, "fair": 1000, "depth": 100_000, "probes": 200,
                 "fill_budget": 110.0}
    figures = cluster_queue.run(home / "cluster-queue", clients=16, **sizes)
    report.data["cluster_queue"] = figures
    for row in cluster_queue.rows(figures):
        report.row(*row)
    report.notes.append(
        f"cluster_queue: 3 nodes x 2 slots on loopback, Redis; submits over 16 threads "
        f"round robin over the nodes; queue filled to {figures['deep_depth']} at "
        f"{figures['fill_per_s']:.0f} submits/s ({figures['fill_s']:.0f} s)")


def section_stream(report: Report, opts: argparse.Namespace, home: Path) -> None:
    from bench import stream_latency
    from oxide_cluster.client import Node

    source = home / "chunk.txt"
    source.write_bytes(base64.b64encode(os.urandom(786432)))  # 1 MiB of text
    loop = f"for i in $(seq {opts.megabytes}); do cat {source}; done"
    agent = AgentProcess(home / "stream-agent", extra_args=(
        "--output-limit", str((opts.megabytes + 16) * MB)))
    agent.start()
    try:
        node = Node(agent.url, agent.secret)
        stream_latency.run_task(node, "true")
        process = psutil.Process(agent.pid)
        rss_before = process.memory_info().rss
        delays = stream_latency.latency(node)
        sampler = stream_latency.RssSampler(agent.pid)
        sampler.start()
        cpu_before = sum(process.cpu_times()[:2])
        _, seconds, received = stream_latency.run_task(node, "sh", "-c", loop)
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        sampler.stopped.set()
        sampler.join()
    finally:
        agent.terminate()
    piped, pipe_seconds = stream_latency.pipe_baseline(loop)
    pipe_rate = piped / MB / pipe_seconds
    ws_rate = received / MB / seconds
    report.row("stream", "line latency p50 (/ws)", f"{percentile(delays, 0.5):.1f} ms")
    report.row("stream", "line latency p99 (/ws)", f"{percentile(delays, 0.99):.1f} ms",
               goal="< 50 ms")
    report.row("stream", f"throughput /ws, {received // MB} MiB", f"{ws_rate:.0f} MiB/s",
               "cat | pipe", f"{pipe_rate:.0f} MiB/s", f"{ws_rate / pipe_rate:.2f}")
    report.row("resources", "agent RSS peak while streaming", f"{sampler.peak / MB:.0f} MiB",
               "before", f"{rss_before / MB:.0f} MiB",
               f"+{(sampler.peak - rss_before) / MB:.0f} MiB", "growth < 64 MiB")
    report.row("resources", "agent CPU while streaming", f"{100 * cpu / seconds:.0f} %",
               goal="of one core")
    report.data["stream"] = {"megabytes": opts.megabytes, "line_delays_ms": delays,
                             "ws_mib_s": ws_rate, "pipe_mib_s": pipe_rate,
                             "rss_before": rss_before, "rss_peak": sampler.peak,
                             "cpu_s": cpu, "seconds": seconds}


def section_workspace(report: Report, opts: argparse.Namespace, home: Path) -> None:
    from bench import workspace

    figures = workspace.measure(5000, 100, home / "workspace")
    report.data["workspace"] = figures
    for row in workspace.rows(figures):
        report.row(*row)
    report.notes.append("workspace: baselines are tar -c piped into one chunked POST to a "
                        "stdlib sink process (writing the tar; or piping it into tar -x); "
                        "the faster of two sink runs is kept")


def section_discovery(report: Report, opts: argparse.Namespace, home: Path) -> None:
    if os.geteuid() != 0:
        report.row("discovery", "join / crash detection", "skipped (needs root)")
        report.notes.append("discovery: skipped, network namespaces need root")
        return
    from concurrent.futures import ThreadPoolExecutor

    from bench import discovery

    discovery.harness.cleanup_stale()
    with ThreadPoolExecutor(max_workers=4) as pool:
        result = discovery.bench_size(3, opts.discovery_runs, home / "discovery", pool)
    report.data["discovery"] = result
    report.row("discovery", "join N=3 (from process start)",
               f"{result['median_join_from_start_s'] * 1000:.0f} ms")
    report.row("discovery", "join N=3 (from /ready)",
               f"{result['median_join_from_ready_s'] * 1000:.0f} ms",
               "poll round", f"{result['median_join_poll_round_s'] * 1000:.0f} ms")
    report.row("discovery", "crash detection N=3", f"{result['median_crash_detect_s']:.2f} s",
               "dead_after", "2.50 s")


def section_failover(report: Report, opts: argparse.Namespace, home: Path) -> None:
    from bench import failover
    from tests import support

    redis = RedisServer(home / "failover-redis")
    redis.start()
    agents = [AgentProcess(home / f"failover{i}", secret=support.SECRET,
                           extra_args=("--redis", redis.url)) for i in range(3)]
    results: dict[str, list[float]] = {"kill -9": [], "clean stop": []}
    try:
        for agent in agents:
            agent.start()
        token = 1
        for how in results:
            for _ in range(opts.failover_runs):
                elapsed, token = failover.one_run(agents, how, token)
                results[how].append(elapsed)
    finally:
        for agent in agents:
            agent.terminate()
        redis.stop()
    report.data["failover"] = results
    for (how, times), goal in zip(results.items(), ("<= 3 s", "<= 0.5 s"), strict=True):
        report.row("failover", f"new leader after {how} (median of {len(times)})",
                   f"{statistics.median(times):.2f} s", "leader_ttl", "2.00 s", goal=goal)


def section_idle(report: Report, opts: argparse.Namespace, home: Path) -> None:
    fakes = Announcers(29, SECRET, ("127.0.0.1", 0))
    agent = AgentProcess(home / "idle-agent", secret=SECRET, discovery=True, extra_args=(
        "--peers", ",".join(f"127.0.0.1:{port}" for port in fakes.ports)))
    fakes.target = ("127.0.0.1", agent.discovery_port)
    alone = LocalAgent()
    agent.start()
    fakes.start()
    try:
        with alone:
            poll_until(lambda: agent.get("/api/cluster/nodes").json()["healthy_nodes"] == 30,
                       30, message="30 healthy nodes")
            time.sleep(1.0)  # let start-up work settle
            procs = [psutil.Process(agent.pid), psutil.Process(alone.pid)]
            cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
            started = time.monotonic()
            time.sleep(opts.idle)
            wall = time.monotonic() - started
            cpu = [100 * (sum(p.cpu_times()[:2]) - c) / wall for p, c in zip(procs, cpu0,
                                                                             strict=True)]
            rss = [p.memory_info().rss / MB for p in procs]
            healthy = agent.get("/api/cluster/nodes").json()["healthy_nodes"]
    finally:
        fakes.stop()
        agent.terminate()
    report.data["idle"] = {"seconds": wall, "cpu_percent": cpu, "rss_mib": rss,
                           "healthy_at_end": healthy, "datagrams_sent": fakes.sent,
                           "datagrams_received": fakes.received}
    report.row("resources", "agent CPU idle, 30 peers", f"{cpu[0]:.1f} %",
               "standalone", f"{cpu[1]:.1f} %")
    report.row("resources", "agent RSS idle, 30 peers", f"{rss[0]:.0f} MiB",
               "standalone", f"{rss[1]:.0f} MiB")
    report.notes.append(f"idle: {opts.idle:.0f} s window, both agents at once; 29 of the 30 "
                        f"peers are simulated announcers (bench/announcers.py); "
                        f"{healthy} healthy at the end")


def section_fanout(report: Report, opts: argparse.Namespace, home: Path) -> None:
    from bench import fanout

    root = fanout.fetch_suite(home / "fanout")
    files = len(list((root / "tests" / "oxide_split").glob("test_*.py")))
    runs: dict[str, dict[str, Any]] = {"local": fanout.local(root, [])}
    plugin = fanout.xdist()
    if plugin is not None:
        runs["xdist"] = fanout.local(root, ["-n", "2"], plugin)
    else:
        report.notes.append("fanout: pytest-xdist could not be installed: no -n 2 row")
    with Cluster(home / "fanout-cluster", 1) as cluster:
        entry = cluster.non_leader()
        runs["split by size"] = fanout.pool(entry.url, root, home / "fo1", queue=False)
        runs["split by durations"] = fanout.pool(entry.url, root, home / "fo2", queue=False)
        runs["queue-split"] = fanout.pool(entry.url, root, home / "fo3", queue=True)
        durations = entry.get(f"/suites/{fanout.SUITE}/durations").json()["durations"]
    # The machine is shared: the baseline runs again after the pool, and the pool's runs
    # are compared with the mean of the two.
    again = fanout.local(root, [])
    runs["local"]["wall_s_runs"] = [runs["local"]["wall_s"], again["wall_s"]]
    runs["local"]["wall_s"] = (runs["local"]["wall_s"] + again["wall_s"]) / 2
    bound = fanout.lower_bound(durations, 3)
    report.data["fanout"] = {"files": files, "runs": runs, "lower_bound_s": bound,
                             "summed_test_s": sum(durations.values())}
    base = runs["local"]
    counts = {name: run["tests"] for name, run in runs.items()}
    same = len(set(counts.values())) == 1
    labels = {"local": "local, 1 process (mean of before and after)", "xdist": "local, pytest -n 2",
              "split by size": "pool --parallel 3 --split (size)",
              "split by durations": "pool --parallel 3 --split (durations)",
              "queue-split": "pool --parallel 3 --queue-split"}
    for name, run in runs.items():
        ratio = f"{run['wall_s'] / base['wall_s']:.2f}"
        report.row("fanout", f"{labels[name]}: {run['tests']} tests, exit {run['code']}",
                   f"{run['wall_s']:.1f} s", "local, 1 process", f"{base['wall_s']:.1f} s",
                   ratio, "<= 0.6" if name.startswith(("split", "queue")) else "-")
    queue = runs["queue-split"]
    busiest = max(queue["worker_busy_s"].values(), default=0.0)
    report.row("fanout", f"queue-split: busiest worker ({queue['batches']} batches)",
               f"{busiest:.1f} s", "lower bound (test time / 3)", f"{bound:.1f} s",
               f"{busiest / bound:.2f}" if bound else "-", "<= 1.10")
    by_time = runs["split by durations"]
    shard_sum = sum(by_time["task_seconds"])
    if by_time["slowest_shard_s"] and shard_sum:
        # On 3 machines nothing is shared: a shard would take its share of the local run.
        alone = by_time["slowest_shard_s"] / shard_sum * base["wall_s"]
        report.row("fanout", f"estimate on 3 machines: local / 3 x balance "
                   f"{by_time['slowest_shard_s'] / (shard_sum / 3):.2f} (slowest / mean "
                   "shard)", f"{alone:.1f} s", "local, 1 process", f"{base['wall_s']:.1f} s",
                   f"{alone / base['wall_s']:.2f}", "<= 0.6")
    report.notes.append(f"fanout: {files} test modules (one per test class); tests per run "
                        f"{counts} ({'all equal' if same else 'NOT EQUAL'}); summed test "
                        f"time {sum(durations.values()):.1f} s; slowest shard of the split "
                        f"by durations {runs['split by durations']['slowest_shard_s']} s; "
                        f"local runs {runs['local']['wall_s_runs']}; load average "
                        f"{os.getloadavg()[0]:.1f} at the end")


def section_escape(report: Report, opts: argparse.Namespace, home: Path) -> None:
    from bench import escape

    count = 200 if opts.quick else 1000
    figures = escape.measure(count, 100)
    baseline = escape.measure(100, 100, "--cgroups", "off")
    report.data["escape"] = {"cgroups": figures, "off": baseline}
    for row in escape.rows(figures, baseline):
        report.row(*row)


def section_retention(report: Report, opts: argparse.Namespace, home: Path) -> None:
    from bench import retention

    figures = retention.measure_agent(10_000 if opts.quick else 100_000)
    report.data["retention"] = {k: v for k, v in figures.items()
                                if k not in ("api_during_s", "api_after_s")}
    for row in retention.rows(figures):
        report.row(*row)
    report.notes.append("retention: one client runs /bin/true through POST /execute?wait "
                        "while the agent's start-up prune runs, then as many calls after it")


# -- driver -------------------------------------------------------------------------------

def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 2 min)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset of " + ",".join(SECTIONS))
    parser.add_argument("--skip", default="", help="sections to leave out")
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--clients", type=int, default=8)
    opts = parser.parse_args(argv)
    opts.chosen = [s for s in opts.sections.split(",") if s and s not in opts.skip.split(",")]
    unknown = set(opts.chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    quick = opts.quick
    opts.rounds = 1 if quick else 3
    opts.rates = (20, 100)
    opts.duration = 2.0 if quick else 5.0
    opts.megabytes = 128 if quick else 1024
    opts.discovery_runs = 1 if quick else 2
    opts.failover_runs = 1 if quick else 2
    opts.idle = 4.0 if quick else 10.0
    if quick:
        opts.tasks = min(opts.tasks, 300)
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = options(argv)
    report = Report()
    began = time.monotonic()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="oxide-bench-") as scratch, \
            contextlib.ExitStack() as stack:
        home = Path(scratch)
        rigs: dict[str, Any] = {}
        if {"tasks", "latency"} & set(opts.chosen):
            started = time.monotonic()
            timings["celery venv"] = celery_bench.ensure_venv()
            rigs["single"] = stack.enter_context(LocalAgent("--max-tasks", str(opts.clients)))
            rigs["cluster"] = stack.enter_context(Cluster(home / "cluster", opts.clients))
            rigs["celery"] = stack.enter_context(celery_bench.CeleryRig(home / "celery"))
            timings["start rigs"] = time.monotonic() - started
        for name in opts.chosen:
            print(f"== {name}", flush=True)
            started = time.monotonic()
            if name in ("tasks", "latency"):
                globals()[f"section_{name}"](report, rigs, opts)
            else:
                globals()[f"section_{name}"](report, opts, home)
            timings[name] = time.monotonic() - started
            if name == "latency" or (name == "tasks" and "latency" not in opts.chosen):
                stack.close()
    total = time.monotonic() - began
    info = machine()
    print_table(f"python -m bench{' --quick' if opts.quick else ''}: {info['cores']} cores "
                f"{info['cpu']}, Python {info['python']}, {total:.0f} s",
                ["section", "measure", "oxide", "baseline", "baseline value", "ratio", "goal"],
                report.rows)
    for note in report.notes:
        print(f"  {note}")
    print("  seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    path = save("bench", {"machine": info, "quick": opts.quick, "sections": opts.chosen,
                          "total_s": total, "timings_s": timings, "table": report.rows,
                          "notes": report.notes, "data": report.data})
    print(f"  saved {path}")


if __name__ == "__main__":
    main()

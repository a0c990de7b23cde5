"""The standalone queue: many ``/bin/true`` submitted at once to a node with few slots.

    python -m bench.queue [--tasks 2000] [--slots 2] [--clients 16]

Baseline, same node, same run: the one-node HTTP rate (``bench.common.http_rate``: each
client waits for its task, so nothing queues). Then, with every slot held by a task that
waits for a file, every task is submitted (``POST /execute`` without ``?wait``,
``--clients`` keep-alive threads) so all of them queue; the file is created and the node
drains its queue. Reported: drain rate (tasks / (last end - release)), queue wait
(``started_at - created_at``) p50/p99, submit latency p50/p99 while the queue fills, the
agent's RSS with the queue full, and two order checks: priority inversions (pairs where
a task started while a higher-priority one was waiting) and fair share (a group of 10
submitted after a group of ``tasks/2``, one priority: its last task must start before the
big group's 50th).
"""

from __future__ import annotations

import argparse
import bisect
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import Client, LocalAgent, http_rate, print_table, save
from bench.load import parse_rfc3339, percentile


def submit_all(port: int, bodies: list[dict[str, Any]], clients: int
               ) -> tuple[list[float], list[dict[str, Any]]]:
    """Submit every body (in order, spread over threads); (latencies, answers)."""
    return submit_spread([port], bodies, clients)


def submit_spread(ports: list[int], bodies: list[dict[str, Any]], clients: int,
                  budget: float | None = None) -> tuple[list[float], list[dict[str, Any]]]:
    """Submit ``bodies`` in order over ``clients`` threads, thread i on ``ports[i % n]``;
    (latencies, answers). With ``budget``, submitting stops after that many seconds."""
    lock = threading.Lock()
    cursor = [0]
    latencies: list[float] = []
    answers: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    stop_at = None if budget is None else time.monotonic() + budget

    def worker(port: int) -> None:
        try:
            client = Client(port)
            while True:
                with lock:
                    if cursor[0] >= len(bodies) or (stop_at is not None
                                                    and time.monotonic() > stop_at):
                        return
                    body = bodies[cursor[0]]
                    cursor[0] += 1
                started = time.perf_counter()
                status, answer = client.call("POST", "/execute", body)
                elapsed = time.perf_counter() - started
                assert status in (200, 202), (status, answer)
                with lock:
                    latencies.append(elapsed)
                    answers.append(answer)
        except BaseException as error:  # surfaced after join
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(ports[i % len(ports)],))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return latencies, answers


def all_tasks(port: int) -> list[dict[str, Any]]:
    client = Client(port)
    found: list[dict[str, Any]] = []
    cursor = ""
    while True:
        status, page = client.call("GET", f"/tasks?limit=1000{cursor}")
        assert status == 200, (status, page)
        found.extend(page["tasks"])
        if not page["next_cursor"]:
            return found
        cursor = f"&cursor={page['next_cursor']}"


def drain(port: int, pid: int, deadline: float) -> int:
    """Wait until nothing is queued or running; the largest RSS seen (bytes)."""
    client = Client(port)
    process = psutil.Process(pid)
    rss = 0
    while time.monotonic() < deadline:
        rss = max(rss, process.memory_info().rss)
        _, stats = client.call("GET", "/stats")
        if stats["queued"] == 0 and stats["running"] == 0:
            return rss
        time.sleep(0.2)
    raise RuntimeError("the queue did not drain in time")


def run_queued(port: int, pid: int, bodies: list[dict[str, Any]], slots: int, clients: int,
               gate: Path) -> tuple[list[float], list[dict[str, Any]], float, int]:
    """Hold every slot, submit ``bodies`` (they all queue), then let go and drain.

    Returns (submit latencies, the tasks as finished, release time, peak RSS)."""
    client = Client(port)
    hold = f"while [ ! -e {gate} ]; do sleep 0.02; done"
    for _ in range(slots):
        status, _ = client.call("POST", "/execute", {"command": "sh", "args": ["-c", hold],
                                                     "group": "hold"})
        assert status == 202, status
    latencies, answers = submit_all(port, bodies, clients)
    assert all(answer["state"] == "queued" for answer in answers), "a task did not queue"
    rss = psutil.Process(pid).memory_info().rss
    released = time.time()
    gate.touch()
    rss = max(rss, drain(port, pid, time.monotonic() + 600))
    gate.unlink()
    ids = {answer["id"] for answer in answers}
    tasks = [t for t in all_tasks(port) if t["id"] in ids]
    assert len(tasks) == len(bodies) and {t["state"] for t in tasks} == {"succeeded"}, \
        {t["state"] for t in tasks}
    return latencies, tasks, released, rss


def inversions(tasks: list[dict[str, Any]]) -> int:
    """Pairs (a, b): b of higher priority was queued when a started, and started after a."""
    created: dict[int, list[float]] = {}
    started: dict[int, list[float]] = {}
    for task in tasks:
        created.setdefault(task["priority"], []).append(parse_rfc3339(task["created_at"]))
        started.setdefault(task["priority"], []).append(parse_rfc3339(task["started_at"]))
    for values in (*created.values(), *started.values()):
        values.sort()
    count = 0
    for task in tasks:
        at = parse_rfc3339(task["started_at"])
        for priority in created:
            if priority > task["priority"]:
                # waiting then = created before ``at`` and not started by ``at``
                count += bisect.bisect_left(created[priority], at) \
                    - bisect.bisect_right(started[priority], at)
    return count


def measure(port: int, pid: int, count: int, slots: int, clients: int,
            gate: Path) -> dict[str, Any]:
    # Priorities 0..2 in submission order, one group: dispatch must keep priority order.
    bodies = [{"command": "/bin/true", "priority": i % 3, "group": "one"} for i in range(count)]
    latencies, tasks, released, rss = run_queued(port, pid, bodies, slots, clients, gate)
    created = [parse_rfc3339(t["created_at"]) for t in tasks]
    started = [parse_rfc3339(t["started_at"]) for t in tasks]
    finished = [parse_rfc3339(t["finished_at"]) for t in tasks]
    waits = [s - c for s, c in zip(started, created, strict=True)]
    after_release = [s - released for s in started]
    # Fair share: a group of count/2 then a group of 10, one priority.
    half = max(count // 2, 60)
    shared = [{"command": "/bin/true", "group": "big"} for _ in range(half)]
    shared += [{"command": "/bin/true", "group": "small"} for _ in range(10)]
    _, fair, _, _ = run_queued(port, pid, shared, slots, clients, gate)
    big = sorted(parse_rfc3339(t["started_at"]) for t in fair if t["group"] == "big")
    small_last = max(parse_rfc3339(t["started_at"]) for t in fair if t["group"] == "small")
    return {
        "tasks": len(tasks),
        "drain_per_s": len(tasks) / (max(finished) - released),
        "wait_p50_s": percentile(waits, 0.5), "wait_p99_s": percentile(waits, 0.99),
        "start_after_release_p99_s": percentile(after_release, 0.99),
        "submit_p50_ms": percentile(latencies, 0.5) * 1000,
        "submit_p99_ms": percentile(latencies, 0.99) * 1000,
        "rss_mb": rss / 2**20,
        "priority_inversions": inversions(tasks),
        "fair_groups": (half, 10),
        "small_last_start_before_big_50th": small_last < big[49],
        "big_started_before_small_last": sum(1 for t in big if t < small_last),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    options = parser.parse_args()
    with LocalAgent("--max-tasks", str(options.slots)) as agent:
        http_rate(agent.port, 50, options.slots)  # warm up
        baseline, _, _ = http_rate(agent.port, min(options.tasks, 600), options.slots)
        gate = Path(tempfile.mkdtemp(prefix="oxide-queue-")) / "go"
        figures = measure(agent.port, agent.pid, options.tasks, options.slots,
                          options.clients, gate)
    rows = [
        [f"one node, HTTP ?wait, {options.slots} clients (baseline)", f"{baseline:.0f}/s", "-"],
        [f"queue drain, {figures['tasks']} queued at once", f"{figures['drain_per_s']:.0f}/s",
         f"{figures['drain_per_s'] / baseline:.2f}"],
        ["queue wait (start - admission) p50 / p99",
         f"{figures['wait_p50_s']:.2f} s / {figures['wait_p99_s']:.2f} s", "-"],
        ["start after release p99", f"{figures['start_after_release_p99_s']:.2f} s", "-"],
        [f"submit latency p50 / p99 while the queue fills to {figures['tasks']}",
         f"{figures['submit_p50_ms']:.1f} ms / {figures['submit_p99_ms']:.1f} ms", "-"],
        ["agent RSS with the queue full", f"{figures['rss_mb']:.0f} MB", "-"],
        ["priority inversions (pairs)", str(figures["priority_inversions"]), "0"],
        [f"groups of {figures['fair_groups'][0]} and 10: small's last start before big's 50th",
         f"{figures['small_last_start_before_big_50th']} "
         f"({figures['big_started_before_small_last']} big before it)", "True"],
    ]
    print_table(f"standalone queue: {options.slots} slots, {options.clients} submit clients",
                ["measure", "value", "ratio to baseline / goal"], rows)
    path = save("queue", {"baseline_per_s": baseline, **figures, "slots": options.slots,
                          "clients": options.clients})
    print(f"saved {path}")


if __name__ == "__main__":
    main()

"""Bounded load: many concurrent clients submit tasks; count outcomes and API latency.

    python -m bench.overload [--clients 200] [--tasks-per-client 5]

Loopback only, a fixed number of tasks, and a time limit. Every client submits
``POST /execute?wait=30`` (``/bin/true``) on its own keep-alive connection; a capacity
refusal (429/503 with ``Retry-After``) is counted and retried after the advertised
delay. At the end every accepted task must have reached a terminal state.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from collections import Counter
from typing import Any

TERMINAL = {"succeeded", "failed", "cancelled", "timed_out", "lost", "rejected"}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def run_load(ports: list[int], secret: str, clients: int, tasks_per_client: int,
             time_limit: float = 300.0) -> dict[str, Any]:
    """Drive the load; returns counts, latencies and the ids of accepted tasks."""
    lock = threading.Lock()
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    accepted: dict[str, int] = {}
    unexpected: list[str] = []
    deadline = time.monotonic() + time_limit

    def client(number: int) -> None:
        port = ports[number % len(ports)]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = json.dumps({"command": "/bin/true"}).encode()
        headers = {"X-Cluster-Secret": secret, "Content-Type": "application/json"}
        done = 0
        while done < tasks_per_client and time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                connection.request("POST", "/execute?wait=30", body=body, headers=headers)
                reply = connection.getresponse()
                raw = reply.read()
            except (OSError, http.client.HTTPException) as error:
                with lock:
                    unexpected.append(f"connection: {error}")
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            elapsed = time.perf_counter() - started
            with lock:
                statuses[reply.status] += 1
                latencies.append(elapsed)
            if reply.status in (200, 202):
                task = json.loads(raw)
                with lock:
                    accepted[task["id"]] = port
                done += 1
            elif reply.status in (429, 503) and reply.getheader("Retry-After"):
                time.sleep(min(float(reply.getheader("Retry-After") or 1), 1.0))
            else:
                with lock:
                    unexpected.append(f"{reply.status}: {raw[:200]!r}")
                done += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    unfinished = []
    for task_id, port in accepted.items():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", f"/task/{task_id}?wait=30",
                           headers={"X-Cluster-Secret": secret})
        state = json.loads(connection.getresponse().read())["state"]
        connection.close()
        if state not in TERMINAL:
            unfinished.append(task_id)
    return {
        "clients": clients, "tasks_wanted": clients * tasks_per_client,
        "accepted": len(accepted), "statuses": dict(statuses), "unexpected": unexpected,
        "unfinished": unfinished, "seconds": wall,
        "p50_ms": percentile(latencies, 0.50) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
    }


def main() -> None:
    from bench.common import SECRET, LocalAgent, print_table, save

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--tasks-per-client", type=int, default=5)
    options = parser.parse_args()
    with LocalAgent("--max-tasks", "4") as agent:
        result = run_load([agent.port], SECRET, options.clients, options.tasks_per_client)
    rows = [[result["clients"], result["accepted"], result["statuses"].get(429, 0),
             len(result["unexpected"]), len(result["unfinished"]),
             f"{result['p50_ms']:.1f}", f"{result['p99_ms']:.1f}",
             f"{result['accepted'] / result['seconds']:.0f}"]]
    print_table("load on one node (loopback, --max-tasks 4)",
                ["clients", "accepted", "429s", "unexpected", "unfinished", "p50 ms",
                 "p99 ms", "tasks/s"], rows)
    print(f"saved {save('overload', result)}")


if __name__ == "__main__":
    main()

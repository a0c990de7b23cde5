"""Live output over /ws: line latency (p50/p99), throughput next to a plain pipe, agent RSS.

    python bench/stream_latency.py [--megabytes 500]

Starts its own agent (loopback, temporary state dir, output limit raised above the
volume), attaches one WebSocket client with the bundled blocking client, and prints a
table. Goals: p99 < 50 ms, >= 100 MB/s, RSS growth < 64 MB. Bounded: a few minutes at most.
"""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oxide_cluster.client import Node, decode_output
from tests.support import SECRET, AgentProcess

LATENCY_SCRIPT = (
    "import sys, time\n"
    "time.sleep(0.3)\n"
    "for i in range(400):\n"
    "    sys.stdout.write(f'{time.time():.6f} {i}\\n'); sys.stdout.flush()\n"
    "    time.sleep(0.005)\n"
)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_task(node: Node, command: str, *args: str) -> tuple[str, float, int]:
    """Submit, attach, read to the end; returns (task id, seconds, bytes received)."""
    task = node.request("POST", "/execute", {"command": command, "args": list(args)})
    ws = node.websocket(timeout=60)
    started = time.perf_counter()
    ws.send_json({"op": "attach", "task": task["id"]})
    received = 0
    for message in ws.messages():
        if message["type"] == "output":
            received += len(decode_output(message))
        elif message["type"] == "state":
            break
    ws.close()
    return task["id"], time.perf_counter() - started, received


def latency(node: Node) -> list[float]:
    task = node.request("POST", "/execute",
                        {"command": sys.executable, "args": ["-c", LATENCY_SCRIPT]})
    ws = node.websocket(timeout=60)
    ws.send_json({"op": "attach", "task": task["id"]})
    delays, pending = [], b""
    for message in ws.messages():
        if message["type"] == "output":
            now = time.time()
            pending += decode_output(message)
            *lines, pending = pending.split(b"\n")
            delays += [(now - float(line.split()[0])) * 1000 for line in lines]
        elif message["type"] == "state":
            break
    ws.close()
    return delays


def pipe_baseline(command: str) -> tuple[int, float]:
    """The same output read from a plain pipe: (bytes, seconds), the throughput baseline."""
    started = time.perf_counter()
    pipe = subprocess.Popen(["sh", "-c", command], stdout=subprocess.PIPE)
    assert pipe.stdout is not None
    piped = 0
    while chunk := pipe.stdout.read(65536):
        piped += len(chunk)
    pipe.wait()
    return piped, time.perf_counter() - started


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            self.peak = max(self.peak, self.process.memory_info().rss)


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__)
    options.add_argument("--megabytes", type=int, default=500)
    args = options.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        source = home / "chunk.txt"
        source.write_bytes(base64.b64encode(os.urandom(786432)))  # 1 MiB of text
        loop = f"for i in $(seq {args.megabytes}); do cat {source}; done"
        agent = AgentProcess(home / "agent", extra_args=(
            "--output-limit", str((args.megabytes + 16) * 1024 * 1024)))
        agent.start()
        try:
            node = Node(agent.url, SECRET)
            run_task(node, "true")  # warm up
            rss_before = psutil.Process(agent.pid).memory_info().rss
            delays = latency(node)
            sampler = RssSampler(agent.pid)
            sampler.start()
            _, seconds, received = run_task(node, "sh", "-c", loop)
            sampler.stopped.set()
            sampler.join()
            rss_after = psutil.Process(agent.pid).memory_info().rss
        finally:
            agent.terminate()
        piped, pipe_seconds = pipe_baseline(loop)
    mb = 1024 * 1024
    ws_rate, pipe_rate = received / mb / seconds, piped / mb / pipe_seconds
    rows = [
        ("line latency p50", f"{percentile(delays, 0.50):.2f} ms", "-"),
        ("line latency p99", f"{percentile(delays, 0.99):.2f} ms", "< 50 ms"),
        ("lines measured", str(len(delays)), "400"),
        (f"throughput /ws ({received // mb} MiB)", f"{ws_rate:.0f} MiB/s", ">= 100 MB/s"),
        (f"throughput cat | pipe ({piped // mb} MiB)", f"{pipe_rate:.0f} MiB/s", "-"),
        ("ratio /ws : pipe", f"{ws_rate / pipe_rate:.2f}", "-"),
        ("agent RSS before", f"{rss_before / mb:.0f} MiB", "-"),
        ("agent RSS peak during", f"{sampler.peak / mb:.0f} MiB", "-"),
        ("agent RSS growth (peak)", f"{(sampler.peak - rss_before) / mb:.0f} MiB", "< 64 MB"),
        ("agent RSS after", f"{rss_after / mb:.0f} MiB", "-"),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"{'measure':<{width}}  {'value':>14}  goal")
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value:>14}  {goal}")


if __name__ == "__main__":
    main()

"""Leader failover time with Redis: after ``kill -9`` of the leader and after a clean stop.

    python bench/failover.py [--runs 5] [--ttl 2.0]

Starts a throwaway redis-server and three agents on loopback, then repeatedly removes the
leader and measures the time until another agent answers ``/api/cluster/leader`` with
itself and a larger token; the removed agent is started again before the next run.
Goals: kill -9 <= 3 s, clean stop <= 0.5 s. Bounded: gives up after 170 s.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, save
from tests.redis_server import RedisServer
from tests.support import AgentProcess, http, poll_until

BUDGET = 170.0


def node_id(agent: AgentProcess) -> str:
    return (agent.state_dir / "node_id").read_text().strip()


def self_leader(agents: list[AgentProcess], newer_than: int) -> tuple[AgentProcess, int] | None:
    for agent in agents:
        if agent.process is None or agent.process.poll() is not None:
            continue
        view = http("GET", agent.url + "/api/cluster/leader", timeout=0.5).json()
        if view["node_id"] == node_id(agent) and view["token"] > newer_than:
            return agent, view["token"]
    return None


def one_run(agents: list[AgentProcess], how: str, token: int) -> tuple[float, int]:
    leader, token = poll_until(lambda: self_leader(agents, token - 1), 20, 0.02,
                               "a leader")
    others = [agent for agent in agents if agent is not leader]
    assert leader.process is not None
    started = time.monotonic()
    if how == "kill -9":
        leader.process.kill()
    else:
        leader.process.send_signal(signal.SIGTERM)
    _new, new_token = poll_until(lambda: self_leader(others, token), 10, 0.005,
                                 "a new leader")
    elapsed = time.monotonic() - started
    leader.process.wait(20)
    leader.start()
    return elapsed, new_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ttl", type=float, default=2.0)
    options = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="oxide-failover-"))
    redis = RedisServer(home / "redis")
    redis.start()
    agents = [AgentProcess(home / f"node{i}",
                           extra_args=("--redis", redis.url, "--leader-ttl", str(options.ttl)))
              for i in range(3)]
    began = time.monotonic()
    results: dict[str, list[float]] = {"kill -9": [], "clean stop": []}
    try:
        for agent in agents:
            agent.start()
        token = 1
        for how in ("kill -9", "clean stop"):
            for _ in range(options.runs):
                if time.monotonic() - began > BUDGET:
                    print("time budget spent; stopping early")
                    break
                elapsed, token = one_run(agents, how, token)
                results[how].append(elapsed)
                print(f"{how}: {elapsed:.3f} s (now token {token})")
    finally:
        for agent in agents:
            agent.terminate()
        redis.stop()
    rows = [[how, len(times), f"{statistics.median(times):.3f}", f"{min(times):.3f}",
             f"{max(times):.3f}", goal]
            for (how, times), goal in zip(results.items(), ("<= 3 s", "<= 0.5 s"),
                                          strict=True) if times]
    print_table(f"Leader failover, 3 agents + redis-server, ttl {options.ttl} s",
                ["removal", "runs", "median s", "min s", "max s", "goal"], rows)
    print(f"results: {save('failover', {'ttl': options.ttl, 'seconds': results})}")


if __name__ == "__main__":
    main()

"""Profile every agent of the cluster path: ``/bin/true`` submitted on a non-leader of 3.

    python -m bench.profile_cluster [--tasks 600] [--clients 8] [--out DIR] [--top 25]

Three agents on loopback (static peers, a real redis-server) run under
``twistd --profile --profiler=cprofile --savestats``; the tasks go through a non-leader
(``bench.common.http_rate``); after a clean stop each agent's stats are printed by
cumulative and by own time (leader, entering node, the third node), and kept in ``--out``.
"""

from __future__ import annotations

import argparse
import pstats
import tempfile
from pathlib import Path

from bench.cluster import node_id
from bench.common import SECRET, TWISTD, http_rate
from tests.redis_server import RedisServer
from tests.support import AgentProcess, poll_until


class ProfiledAgent(AgentProcess):
    """An agent whose twistd writes cProfile stats to ``stats`` when it stops."""

    def __init__(self, home: Path, stats: Path) -> None:
        super().__init__(home, secret=SECRET, discovery=True)
        self.stats = stats

    def argv(self) -> list[str]:
        args = super().argv()
        at = args.index("oxide-cluster")
        return [*TWISTD, *args[len(TWISTD):at], f"--profile={self.stats}",
                "--profiler=cprofile", "--savestats", *args[at:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--top", type=int, default=25)
    options = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="oxide-profile-"))
    out = options.out or home
    out.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(home / "redis")
    redis.start()
    agents = [ProfiledAgent(home / f"node{i}", out / f"node{i}.pstats") for i in range(3)]
    for agent in agents:
        others = [f"127.0.0.1:{p.discovery_port}" for p in agents if p is not agent]
        agent.extra_args = ("--peers", ",".join(others), "--redis", redis.url,
                            "--max-tasks", str(options.clients))
    try:
        for agent in agents:
            agent.start()
        for agent in agents:
            poll_until(lambda a=agent: a.get("/api/cluster/nodes").json()["healthy_nodes"] == 3,
                       30, message=f"{agent.name} to see all three")
        leader_id = poll_until(lambda: agents[0].get("/api/cluster/leader").json()["node_id"],
                               30, message="a leader")
        entry = next(a for a in agents if node_id(a) != leader_id)
        http_rate(entry.port, 50, options.clients)
        rate, refused, where = http_rate(entry.port, options.tasks, options.clients)
        names = {node_id(a): a.name for a in agents}
        print(f"{options.tasks} tasks via {entry.name}: {rate:.0f}/s, {refused} refused, "
              f"ran on {({names.get(k, k): v for k, v in where.items()})}", flush=True)
    finally:
        for agent in agents:
            agent.terminate()
        redis.stop()
    for agent in agents:
        role = ("leader" if node_id(agent) == leader_id
                else "entering" if agent is entry else "third")
        print(f"\n===== {agent.name} ({role}) {agent.stats}")
        if not agent.stats.exists():
            print("(no stats written)")
            continue
        stats = pstats.Stats(str(agent.stats))
        stats.sort_stats("tottime").print_stats(options.top)
        stats.sort_stats("cumulative").print_stats(options.top)


if __name__ == "__main__":
    main()

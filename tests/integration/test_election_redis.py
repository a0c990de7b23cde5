"""Leader election between real agents and a real ``redis-server`` on loopback.

A checker thread per agent samples ``/api/cluster/leader`` throughout each test. A sample
that says "I lead with token T" proves leadership somewhere inside its request's
[sent, received] window; two samples of the same term prove it for the whole span between
them, so the checker asserts that no two terms of different nodes are proven to overlap.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from tests import split_brain
from tests.redis_server import RedisServer
from tests.support import AgentProcess, http, poll_until

TTL = 2.0


def node_id_of(agent: AgentProcess) -> str:
    return (agent.state_dir / "node_id").read_text().strip()


def leader_of(agent: AgentProcess, timeout: float = 2.0) -> dict[str, Any]:
    reply = http("GET", agent.url + "/api/cluster/leader", timeout=timeout)
    assert reply.status == 200, reply
    return reply.json()


def split_brain_checker(agents: list[AgentProcess]) -> split_brain.SplitBrainChecker:
    """The shared checker over real agents on loopback."""
    return split_brain.SplitBrainChecker(
        agents, node_id_of, lambda agent: leader_of(agent, timeout=0.5))


def start_cluster(agent_factory, redis: RedisServer, count: int = 3) -> list[AgentProcess]:
    return [agent_factory(extra_args=("--redis", redis.url, "--leader-ttl", str(TTL)))
            for _ in range(count)]


def current_leader(agents: list[AgentProcess]) -> tuple[AgentProcess, int] | None:
    """The agent that says it leads, if all reachable agents agree on node and token."""
    views = {}
    for agent in agents:
        if agent.process is not None and agent.process.poll() is None:
            views[agent.name] = leader_of(agent)
    pairs = {(v["node_id"], v["token"]) for v in views.values()}
    if len(pairs) != 1:
        return None
    ((node_id, token),) = pairs
    for agent in agents:
        if node_id_of(agent) == node_id and agent.name in views:
            return agent, token
    return None


def wait_for_leader(agents: list[AgentProcess], newer_than: int = 0,
                    timeout: float = 15.0, interval: float = 0.05) -> tuple[AgentProcess, int]:
    found = poll_until(
        lambda: (lambda c: c if c is not None and c[1] > newer_than else None)(
            current_leader(agents)),
        timeout, interval=interval, message=f"one leader with a token > {newer_than}")
    return found


def wait_for_new_self_leader(agents: list[AgentProcess], token: int,
                             timeout: float) -> tuple[AgentProcess, int]:
    """First agent whose own answer says it leads with a token > ``token``."""
    def check() -> tuple[AgentProcess, int] | None:
        for agent in agents:
            view = leader_of(agent, timeout=0.5)
            if view["node_id"] == node_id_of(agent) and view["token"] > token:
                return agent, view["token"]
        return None
    return poll_until(check, timeout, interval=0.01, message=f"a leader newer than {token}")


def test_exactly_one_leader_and_every_node_sees_it(agent_factory, redis):
    agents = start_cluster(agent_factory, redis)
    with split_brain_checker(agents):
        leader, token = wait_for_leader(agents)
        views = [leader_of(agent) for agent in agents]
        assert {(v["node_id"], v["token"]) for v in views} == {(node_id_of(leader), token)}
        assert sum(1 for agent, v in zip(agents, views, strict=True)
                   if v["node_id"] == node_id_of(agent)) == 1
        nodes = leader.get("/api/cluster/nodes").json()
        assert nodes["local_node"]["is_leader"] is True
        assert nodes["leader"]["node_id"] == node_id_of(leader)
        assert not any(node["is_leader"] for node in nodes["remote_nodes"])


def test_kill_9_of_the_leader_fails_over_within_3_seconds(agent_factory, redis):
    agents = start_cluster(agent_factory, redis)
    with split_brain_checker(agents):
        leader, token = wait_for_leader(agents)
        others = [agent for agent in agents if agent is not leader]
        killed = time.monotonic()
        leader.kill()
        new, new_token = wait_for_new_self_leader(others, token, timeout=5.0)
        elapsed = time.monotonic() - killed
        print(f"\nfailover after kill -9: {elapsed:.2f} s (token {token} -> {new_token})")
        assert elapsed <= 3.0
        assert new_token > token
        assert wait_for_leader(others)[0] is new


def test_clean_stop_of_the_leader_hands_over_within_half_a_second(agent_factory, redis):
    agents = start_cluster(agent_factory, redis)
    with split_brain_checker(agents):
        leader, token = wait_for_leader(agents)
        others = [agent for agent in agents if agent is not leader]
        assert leader.process is not None
        stopped = time.monotonic()
        leader.process.send_signal(signal.SIGTERM)
        _new, new_token = wait_for_new_self_leader(others, token, timeout=3.0)
        elapsed = time.monotonic() - stopped
        print(f"\nhandover after SIGTERM: {elapsed:.2f} s (token {token} -> {new_token})")
        assert elapsed <= 0.5
        # twistd re-raises the signal it stopped on: -SIGTERM is a clean exit
        assert leader.process.wait(20) in (0, -signal.SIGTERM)


def test_frozen_leader_steps_down_and_never_comes_back_as_leader(agent_factory, redis):
    agents = start_cluster(agent_factory, redis)
    with split_brain_checker(agents):
        leader, token = wait_for_leader(agents)
        others = [agent for agent in agents if agent is not leader]
        frozen = time.monotonic()
        os.kill(leader.pid, signal.SIGSTOP)
        try:
            _new, new_token = wait_for_new_self_leader(others, token, timeout=5.0)
            poll_until(lambda: time.monotonic() > frozen + 1.5 * TTL, 10,
                       message="the leader to stay frozen past its ttl")
        finally:
            os.kill(leader.pid, signal.SIGCONT)
        first = leader_of(leader, timeout=5.0)
        assert first["node_id"] != node_id_of(leader), first
        view = poll_until(lambda: (lambda v: v if v["token"] == new_token else None)(
            leader_of(leader)), 5, message="the old leader to learn the new one")
        assert view["node_id"] != node_id_of(leader)
        assert new_token > token


def test_redis_restart_never_splits_and_elects_again(agent_factory, redis):
    agents = start_cluster(agent_factory, redis)
    with split_brain_checker(agents):
        _leader, token = wait_for_leader(agents)
        redis.restart()  # non-persistent: the lease and the epoch are gone
        _new, new_token = wait_for_leader(agents, newer_than=token, timeout=15.0)
        print(f"\nafter the Redis restart: token {token} -> {new_token}")


def test_redis_down_means_no_leader_then_one_again(agent_factory, redis):
    agents = start_cluster(agent_factory, redis, count=2)
    with split_brain_checker(agents):
        _leader, token = wait_for_leader(agents)
        redis.kill()
        poll_until(lambda: all(leader_of(a)["node_id"] is None for a in agents), 5,
                   message="every node to report no leader while Redis is down")
        redis.start()
        wait_for_leader(agents, newer_than=token, timeout=15.0)


def test_placement_with_a_stale_leader_token_is_refused(agent_factory, redis):
    agents = start_cluster(agent_factory, redis)
    leader, token = wait_for_leader(agents)
    follower = next(agent for agent in agents if agent is not leader)
    poll_until(lambda: leader_of(follower)["token"] == token, message="follower sees token")
    task = {"command": "true"}
    stale = follower.post("/internal/run", {"version": 1, "token": token - 1, "task": task})
    assert stale.status == 409 and stale.json()["error"]["code"] == "stale_leader_token"
    current = {"version": 1, "token": token, "task": task, "wait": 10}
    assert follower.post("/internal/run", current).status == 200
    # The old way in, headers on the public route, is refused by name.
    smuggled = follower.post("/execute", task, headers={"X-Oxide-Leader-Token": str(token)})
    assert smuggled.status == 400 and smuggled.json()["error"]["code"] == "internal_header"
    assert "X-Oxide-Leader-Token" in smuggled.json()["error"]["message"]

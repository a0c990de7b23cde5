"""Shared pytest setup. The reactor is imported lazily by pytest-twisted."""

from __future__ import annotations

import pytest
from hypothesis import settings

from tests.redis_server import RedisServer
from tests.support import (
    AgentProcess,
    free_port,
    loopback_cluster,
    poll_until,
    start_meshed,
    stop_all,
)

# Property tests check correctness, not speed (benchmarks in bench/ do that): no
# per-example deadline, which a loaded 2-core machine turns into spurious failures.
settings.register_profile("oxide", deadline=None)
settings.load_profile("oxide")


@pytest.fixture
def agent_factory(tmp_path, request):
    """Start real ``twistd -n oxide-cluster`` nodes on loopback; logs printed on failure."""
    started: list[AgentProcess] = []

    def start(**options) -> AgentProcess:
        agent = AgentProcess(tmp_path / f"node{len(started)}", **options)
        started.append(agent)
        agent.start()
        return agent

    yield start
    failed = getattr(request.node, "rep_call", None)
    for agent in started:
        agent.terminate()
        if failed is not None and failed.failed:
            print(f"\n===== log of {agent.name} =====\n{agent.log_text()}")


@pytest.fixture
def redis(tmp_path):
    """A real ``redis-server`` on a free loopback port, stopped after the test."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def meshed(tmp_path, request):
    """Start loopback clusters whose nodes know each other (static peers); every node is
    stopped after the test, with its log printed if the test failed. ``leader=True``
    also waits until one node leads (for clusters given ``--redis``)."""
    clusters: list[list[AgentProcess]] = []

    def start(count: int, extra_args: tuple[str, ...] = (),
              leader: bool = False) -> list[AgentProcess]:
        nodes = loopback_cluster(tmp_path / f"cluster{len(clusters)}", count, extra_args)
        clusters.append(nodes)
        start_meshed(nodes)
        if leader:
            poll_until(lambda: any(n.get("/api/cluster/leader").json()["node_id"]
                                   == n.get("/health").json()["node_id"] for n in nodes),
                       timeout=20, message="a node that leads")
        return nodes

    yield start
    report = getattr(request.node, "rep_call", None)
    for nodes in clusters:
        stop_all(nodes, report is not None and report.failed)


@pytest.fixture
def agent(agent_factory) -> AgentProcess:
    return agent_factory()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


# tests/cluster uses pytester to check that a failing scenario prints node logs.
pytest_plugins = ["pytester"]

__all__ = ["free_port"]

"""Shared pytest setup. The reactor is imported lazily by pytest-twisted."""

from __future__ import annotations

import pytest

from tests.support import AgentProcess, free_port


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

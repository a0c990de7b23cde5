"""A real twistd logs JSON lines when asked, by config or by twistd's --logger."""

from __future__ import annotations

import json

from tests.support import TWISTD, AgentProcess

# twistd ends by re-raising the SIGTERM it handled, so the exit status says "terminated".
CLEAN_EXIT = (0, -15)


class _LoggerAgent(AgentProcess):
    """An agent started with a twistd option (before the plugin name)."""

    def argv(self) -> list[str]:
        args = super().argv()
        at = args.index("oxide-cluster")
        return [*args[:at], "--logger", "oxide_cluster.logs.json_observer_factory", *args[at:]]


def json_lines(agent: AgentProcess) -> list[dict]:
    lines = [line for line in agent.log_text().splitlines() if line.strip()]
    assert lines
    return [json.loads(line) for line in lines]  # every line, or the test fails


def check_a_lifetime_of_json(agent: AgentProcess) -> None:
    assert agent.run_task("true")["state"] == "succeeded"
    assert agent.stop() in CLEAN_EXIT
    records = json_lines(agent)
    started = [r for r in records if r["namespace"] == "oxide_cluster.tap" and "node_id" in r]
    assert started and started[0]["node_id"]
    assert f"at http://127.0.0.1:{agent.port}/ " in started[0]["message"]
    finished = [r for r in records if "task_id" in r and r.get("state") == "succeeded"]
    assert finished, records
    assert {"time", "level", "namespace", "message"} <= set(records[-1])


def test_log_format_json_from_the_environment(tmp_path):
    agent = AgentProcess(tmp_path / "node", env={"OXIDE_LOG_FORMAT": "json"})
    try:
        agent.start()
        check_a_lifetime_of_json(agent)
    finally:
        agent.terminate()


def test_twistd_logger_option_names_the_json_observer(tmp_path):
    agent = _LoggerAgent(tmp_path / "node")
    assert agent.argv()[:len(TWISTD)] == TWISTD
    try:
        agent.start()
        check_a_lifetime_of_json(agent)
    finally:
        agent.terminate()


def test_text_is_the_default(agent):
    assert agent.stop() in CLEAN_EXIT
    first = agent.log_text().splitlines()[0]
    assert not first.startswith("{")

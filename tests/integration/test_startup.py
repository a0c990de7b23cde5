"""A real twistd that cannot start says why in one line, exits non-zero and frees its ports;
one that starts says its URL first."""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.support import TWISTD, AgentProcess, poll_until

DEADLINE = 5.0


@pytest.fixture
def agents(request) -> Iterator[list[AgentProcess]]:
    """Agents built by the test; stopped afterwards, their logs printed on failure."""
    made: list[AgentProcess] = []
    yield made
    failed = getattr(request.node, "rep_call", None)
    for agent in made:
        agent.terminate()
        if failed is not None and failed.failed:
            print(f"\n===== log of {agent.name} =====\n{agent.log_text()}")


def exit_code_within_deadline(agent: AgentProcess) -> tuple[int, float]:
    """Start an agent that must fail; its exit code and how long it ran."""
    started = time.monotonic()
    agent.start(wait=False)
    assert agent.process is not None
    code = poll_until(lambda: agent.process.poll() is not None and (agent.process.returncode,),
                      DEADLINE, message=f"{agent.name} to exit")[0]
    return code, time.monotonic() - started


def the_one_error_line(agent: AgentProcess, needle: str) -> str:
    log = agent.log_text()
    assert "Traceback" not in log, log
    assert "Usage:" not in log, log
    lines = [line for line in log.splitlines() if needle in line]
    assert len(lines) == 1, log
    return lines[0]


def can_bind(kind: int, port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def test_taken_discovery_port_ends_start_up_in_one_line(tmp_path, agents):
    agent = AgentProcess(tmp_path / "second", discovery=True)
    agents.append(agent)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first_node:
        first_node.bind(("0.0.0.0", agent.discovery_port))
        code, took = exit_code_within_deadline(agent)
    assert code != 0
    line = the_one_error_line(agent, "cannot start")
    assert line.endswith(f"oxide-cluster: cannot start: discovery_port {agent.discovery_port}: "
                         "address already in use (another node on this host? give each node "
                         "its own --discovery-port)")
    assert "at http://" not in agent.log_text()  # never claimed to serve
    assert can_bind(socket.SOCK_STREAM, agent.port, "127.0.0.1")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", agent.port), timeout=2).close()
    print(f"exit {code} after {took:.2f}s")


def test_taken_http_port_ends_start_up_in_one_line(tmp_path, agents):
    with socket.socket() as first_node:
        first_node.bind(("127.0.0.1", 0))
        first_node.listen()
        agent = AgentProcess(tmp_path / "second", port=first_node.getsockname()[1],
                             discovery=True)
        agents.append(agent)
        code, took = exit_code_within_deadline(agent)
    assert code != 0
    line = the_one_error_line(agent, "cannot start")
    assert line.endswith(f"oxide-cluster: cannot start: listen tcp:{agent.port}:"
                         "interface=127.0.0.1: address already in use (another node on this "
                         "host? give each node its own --listen port)")
    assert "at http://" not in agent.log_text()
    # Discovery had bound its UDP port before the HTTP bind failed: the exit freed it.
    assert can_bind(socket.SOCK_DGRAM, agent.discovery_port, "0.0.0.0")
    print(f"exit {code} after {took:.2f}s")


def test_a_daemonizing_twistd_reports_the_refusal_and_removes_its_pidfile(tmp_path):
    """Without -n, twistd's parent waits for the daemon's verdict: it must get one."""
    agent = AgentProcess(tmp_path / "daemon")
    agent.home.mkdir()
    with socket.socket() as first_node:
        first_node.bind(("127.0.0.1", agent.port))
        first_node.listen()
        args = [arg for arg in agent.argv() if arg not in ("-n", "--pidfile=")]
        args.insert(len(TWISTD), "--logfile=agent.log")
        args.insert(len(TWISTD), "--pidfile=agent.pid")
        parent = subprocess.run(args, cwd=agent.home, env=agent.environment(),
                                capture_output=True, timeout=DEADLINE)
    assert parent.returncode != 0
    assert b"address already in use" in parent.stderr + parent.stdout
    assert not (agent.home / "agent.pid").exists()
    poll_until(lambda: "cannot start" in agent.log_text(), DEADLINE, message="the log line")
    the_one_error_line(agent, "cannot start")


def test_state_dir_under_a_file_is_refused(tmp_path, agents):
    agent = AgentProcess(tmp_path / "node")
    agents.append(agent)
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "blocker").write_text("")
    agent.state_dir = tmp_path / "node" / "blocker" / "state"
    code, _ = exit_code_within_deadline(agent)
    assert code != 0
    line = the_one_error_line(agent, "state_dir")
    assert line.endswith(f"cannot create state_dir {agent.state_dir}: Not a directory")
    assert can_bind(socket.SOCK_STREAM, agent.port, "127.0.0.1")


def test_a_store_that_is_no_database_ends_start_up_in_one_line(tmp_path, agents):
    agent = AgentProcess(tmp_path / "node")
    agents.append(agent)
    agent.state_dir.mkdir(parents=True)
    (agent.state_dir / "oxide.sqlite3").write_bytes(b"not a database" * 512)
    code, _ = exit_code_within_deadline(agent)
    assert code == 1  # twistd alone would exit 0 after its reactor stops
    line = the_one_error_line(agent, "cannot start")
    assert line.endswith(f"oxide-cluster: cannot start: state_dir {agent.state_dir}: cannot "
                         f"open the store {agent.state_dir / 'oxide.sqlite3'}: file is not a "
                         "database")
    assert can_bind(socket.SOCK_STREAM, agent.port, "127.0.0.1")


def test_bad_redis_url_is_refused(tmp_path, agents):
    agent = AgentProcess(tmp_path / "node", extra_args=("--redis", "localhost:6379"))
    agents.append(agent)
    code, _ = exit_code_within_deadline(agent)
    assert code != 0
    line = the_one_error_line(agent, "'redis'")
    assert "bad value for 'redis': Redis URL must start with redis://" in line
    assert not agent.state_dir.joinpath("agent.lock").exists()  # refused before starting


def test_first_lines_give_the_url_and_the_dashboard(agent):
    head = agent.log_text().splitlines()[:10]
    url = f"http://127.0.0.1:{agent.port}/"
    said = [line for line in head if f" at {url} " in line]
    assert said, head
    assert f"(dashboard: {url}ui/)" in said[0]
    assert agent.get("/ui/", secret=None).status == 200  # the address really is the dashboard


def reason(agent: AgentProcess, method: str, path: str, body: bytes | None = None) -> tuple:
    connection = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers={
            "X-Cluster-Secret": agent.secret or "", "Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status, response.reason
    finally:
        connection.close()


def test_status_lines_carry_reason_phrases(agent_factory):
    agent = agent_factory(extra_args=("--max-tasks", "1"))
    sleeper = agent.post("/execute", {"command": "sleep", "args": ["30"]})
    assert sleeper.status == 202, sleeper
    try:
        assert reason(agent, "POST", "/execute", b'{"command": "true", "queue": false}') == (
            429, "Too Many Requests")
        assert reason(agent, "GET", "/ws") == (426, "Upgrade Required")
        assert reason(agent, "GET", "/task/nope") == (404, "Not Found")
    finally:
        agent.post(f"/task/{sleeper.json()['id']}/cancel")


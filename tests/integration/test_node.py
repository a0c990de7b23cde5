"""A real ``twistd -n oxide-cluster`` on loopback, driven over HTTP."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess

import psutil
import pytest

from tests.support import SECRET, poll_until

SLEEP_TREE = ["-c", "sleep 300 & sleep 300 & echo started; wait"]


def test_execute_succeeds_with_output(agent):
    task = agent.run_task("sh", "-c", "echo out; echo err >&2")
    assert task["state"] == "succeeded" and task["exit_code"] == 0
    output = agent.get(f"/task/{task['id']}/output")
    assert output.status == 200
    assert sorted(output.body.splitlines()) == [b"err", b"out"]
    stdout = agent.get(f"/task/{task['id']}/output?stream=stdout")
    assert stdout.body == b"out\n"
    assert task["output_bytes"] == 8


def test_nonzero_exit_is_failed_with_code(agent):
    task = agent.run_task("sh", "-c", "exit 3")
    assert (task["state"], task["exit_code"], task["reason"]) == (
        "failed", 3, "exited with code 3")


def test_auth_is_required_everywhere_but_health(agent):
    assert agent.get("/health", secret=None).status == 200
    for method, path in [("GET", "/ready"), ("GET", "/stats"), ("GET", "/tasks"),
                         ("GET", "/task/x"), ("POST", "/execute"), ("POST", "/task/x/cancel"),
                         ("GET", "/api/cluster/nodes"), ("GET", "/api/cluster/leader"),
                         ("GET", "/api/cluster/health"), ("GET", "/task/x/output")]:
        for secret in (None, "wrong"):
            reply = agent.request(method, path, secret=secret)
            assert reply.status == 401, (method, path, reply)
            assert reply.json()["error"]["code"] == "unauthorized"
    bearer = agent.get("/stats", secret=None, headers={"Authorization": f"Bearer {SECRET}"})
    assert bearer.status == 200


def test_bad_requests(agent):
    bad = agent.post("/execute", {"command": "ls", "timeout": -1})
    assert bad.status == 400 and "timeout" in bad.json()["error"]["message"]
    not_json = agent.post("/execute", raw=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status == 400 and not_json.json()["error"]["code"] == "bad_json"
    form = agent.post("/execute", raw=b"a=b",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 415
    huge = agent.post("/execute", {"command": "ls", "args": ["x" * (2 * 1024 * 1024)]})
    assert huge.status == 413
    assert agent.get("/task/does-not-exist").status == 404
    assert agent.get("/no/such/route").json()["error"]["code"] == "not_found"
    wrong_method = agent.request("DELETE", "/tasks")
    assert wrong_method.status == 405 and "GET" in wrong_method.headers["Allow"]
    assert agent.get("/tasks?limit=0").status == 400
    assert agent.get("/tasks?state=bogus").status == 400


def task_processes(task_id):
    """Live processes started for a task (the executor puts OXIDE_TASK_ID in their env)."""
    found = []
    for process in psutil.process_iter(["environ", "status"]):
        environ = process.info["environ"] or {}
        if environ.get("OXIDE_TASK_ID") == task_id and \
                process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def test_cancel_kills_the_whole_process_group(agent):
    reply = agent.post("/execute", {"command": "sh", "args": SLEEP_TREE})
    assert reply.status == 202
    task_id = reply.json()["id"]
    poll_until(lambda: agent.get(f"/task/{task_id}/output").body == b"started\n",
               message="task output")
    assert len(task_processes(task_id)) == 3  # sh and two sleeps
    cancelled = agent.post(f"/task/{task_id}/cancel?wait=10")
    assert cancelled.status == 200 and cancelled.json()["state"] == "cancelled"
    assert agent.post(f"/task/{task_id}/cancel").status == 409
    poll_until(lambda: task_processes(task_id) == [], timeout=5, message="no task process")


def test_timeout_ends_task_timed_out(agent):
    task = agent.run_task("sleep", "30", timeout=0.5)
    assert task["state"] == "timed_out" and task["signal"] == signal.SIGTERM
    assert task["reason"] == "timed out after 0.5s"


def test_capacity_refusal_with_queue_false_has_retry_after(agent_factory):
    node = agent_factory(extra_args=("--max-tasks", "1"))
    first = node.post("/execute", {"command": "sleep", "args": ["30"]})
    assert first.status == 202
    refused = node.post("/execute", {"command": "true", "queue": False})
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "no_free_slots"
    node.post(f"/task/{first.json()['id']}/cancel?wait=10")
    assert node.run_task("true")["state"] == "succeeded"


def test_restart_keeps_finished_tasks_and_marks_running_lost(agent):
    done = agent.run_task("sh", "-c", "echo kept")
    running = agent.post("/execute", {"command": "sleep", "args": ["300"]}).json()
    assert running["state"] == "running"
    agent.kill()
    # The killed agent's task is now an orphan in its own session: reap it ourselves.
    for process in task_processes(running["id"]):
        process.kill()
    agent.start()
    lost = agent.get(f"/task/{running['id']}").json()
    assert lost["state"] == "lost" and "agent restart" in lost["reason"]
    assert agent.get(f"/task/{done['id']}").json()["state"] == "succeeded"
    assert agent.get(f"/task/{done['id']}/output").body == b"kept\n"


def test_clean_shutdown_cancels_running_tasks(agent):
    running = agent.post("/execute", {"command": "sh", "args": SLEEP_TREE}).json()
    poll_until(lambda: agent.get(f"/task/{running['id']}/output").body, message="output")
    # twistd re-raises the signal that stopped it after a clean shutdown.
    assert agent.stop(timeout=10) in (0, -signal.SIGTERM)
    agent.start()
    task = agent.get(f"/task/{running['id']}").json()
    assert (task["state"], task["reason"]) == ("cancelled", "agent shutdown")


def test_secret_env_never_appears(agent):
    token = "s3cr3t-value-9d8e7f"
    task = agent.run_task("sh", "-c", 'printf %s "$TOKEN" | sha256sum',
                          secret_env={"TOKEN": token})
    assert task["state"] == "succeeded"
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert agent.get(f"/task/{task['id']}/output").body.startswith(digest.encode())
    for path in (f"/task/{task['id']}", "/tasks", "/stats"):
        assert token not in agent.get(path).body.decode()
    assert token not in agent.log_text()
    database = (agent.state_dir / "oxide.sqlite3").read_bytes()
    assert token.encode() not in database


def test_task_does_not_inherit_agent_secret_or_sockets(agent):
    task = agent.run_task("sh", "-c", "env; ls -l /proc/self/fd")
    output = agent.get(f"/task/{task['id']}/output").body.decode()
    assert SECRET not in output
    assert "socket:" not in output


def test_second_agent_on_same_state_dir_refuses(agent, tmp_path):
    from tests.support import AgentProcess

    twin = AgentProcess(agent.home)
    twin.start(wait=False)
    assert twin.process.wait(20) != 0
    assert "in use by another agent" in twin.log_text()


def test_bad_config_stops_startup_naming_the_key(tmp_path):
    from tests.support import AgentProcess

    node = AgentProcess(tmp_path / "bad", extra_args=("--max-tasks", "lots"))
    node.start(wait=False)
    assert node.process.wait(20) != 0
    assert "max_tasks" in node.log_text()


def test_twistd_lists_the_plugin_and_documents_options():
    twistd = shutil.which("twistd")
    if twistd is None:
        pytest.fail("twistd is not on PATH: install the package with the README command")
    env = {**os.environ, "PYTHONPATH": ""}
    listing = subprocess.run([twistd, "--help"], capture_output=True, text=True, env=env,
                             cwd="/", timeout=60)
    assert "oxide-cluster" in listing.stdout
    options = subprocess.run([twistd, "-n", "oxide-cluster", "--help"], capture_output=True,
                             text=True, env=env, cwd="/", timeout=60)
    for option in ("--listen", "--state-dir", "--secret-file", "--max-tasks", "--config",
                   "--max-cpu-percent", "--max-memory-percent", "--output-limit",
                   "--default-timeout", "--max-timeout", "--redis", "--peers"):
        assert option in options.stdout, option


def test_a_cancel_right_after_the_start_ends_by_its_signal_without_a_traceback(agent):
    # The fork path (a cwd, or a cgroup to join): a SIGTERM before exec once ran the
    # agent's own handler in the child (exit code 1, a Twisted traceback as output).
    for _ in range(20):
        task = agent.post("/execute", {"command": "sleep", "args": ["30"], "cwd": "/"}).json()
        ended = agent.post(f"/task/{task['id']}/cancel?wait=10").json()
        assert (ended["state"], ended["exit_code"], ended["signal"]) == \
            ("cancelled", None, signal.SIGTERM), ended
        assert agent.get(f"/task/{task['id']}/output").body == b""

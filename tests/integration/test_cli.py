"""The CLI as CI jobs use it, against real ``twistd`` nodes: exit codes, ``--tty``."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time

import pytest

from tests.integration.test_node import SLEEP_TREE, task_processes
from tests.support import REPO_ROOT, SECRET, poll_until

USAGE_LINE = re.compile(rb"^oxide-cluster: cpu (\d+\.\d) s, peak memory \d+ MiB( \(sampled\))?$")
TASK_LINE = re.compile(rb"^oxide-cluster: task (\S+) on node (\S+) \((http://\S+/ui/#task=\S+)\)$")


def cli(url: str, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OXIDE_")}
    env.update(OXIDE_NODE=url, OXIDE_CLUSTER_SECRET=SECRET, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-m", "oxide_cluster.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(process: subprocess.Popen[bytes], timeout: float = 30) -> tuple[int, bytes, bytes]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def test_tty_gives_the_task_a_terminal(agent):
    assert finished(cli(agent.url, "run", "--tty", "--", "sh", "-c", "test -t 1"))[0] == 0
    assert finished(cli(agent.url, "run", "--", "sh", "-c", "test -t 1"))[0] == 1


def test_tty_output_is_one_stream_on_stdout_and_stdin_ends(agent):
    code, out, err = finished(cli(agent.url, "run", "--tty", "--timeout", "10", "--",
                                  "sh", "-c", "echo out; echo err >&2; cat; exit 3"))
    assert code == 3, err
    assert out == b"out\r\nerr\r\n"  # the terminal's line ends; cat saw end-of-file
    first, usage = err.rstrip(b"\n").split(b"\n")  # the task line, then its usage
    assert TASK_LINE.match(first), err
    assert USAGE_LINE.match(usage), err


def test_run_ends_with_the_tasks_cpu_and_peak_memory(agent):
    burn = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    code, _, err = finished(cli(agent.url, "run", "--", "python3", "-c", burn))
    assert code == 0, err
    match = USAGE_LINE.match(err.rstrip(b"\n").split(b"\n")[-1])
    assert match is not None, err
    assert 0.3 <= float(match.group(1)) <= 1.5, err


def test_cancel_kills_the_whole_group_of_a_tty_task(agent):
    reply = agent.post("/execute", {"command": "sh", "args": SLEEP_TREE, "tty": True})
    assert reply.status == 202 and reply.json()["tty"] is True
    task_id = reply.json()["id"]
    poll_until(lambda: agent.get(f"/task/{task_id}/output").body == b"started\r\n",
               message="task output")
    processes = task_processes(task_id)
    assert len(processes) == 3
    pids = {process.pid for process in processes}
    leader = next(process for process in processes if process.ppid() not in pids)
    assert os.getsid(leader.pid) == leader.pid == os.getpgid(leader.pid)
    cancelled = agent.post(f"/task/{task_id}/cancel?wait=10")
    assert cancelled.status == 200 and cancelled.json()["state"] == "cancelled"
    poll_until(lambda: task_processes(task_id) == [], timeout=5, message="no task process")


def test_run_names_the_task_and_its_node_on_stderr(agent):
    code, out, err = finished(cli(agent.url, "run", "--", "echo", "hi"))
    assert code == 0 and out == b"hi\n"
    match = TASK_LINE.match(err.splitlines()[0])
    assert match is not None, err
    task_id, node_id, link = (part.decode() for part in match.groups())
    assert link == f"{agent.url}/ui/#task={task_id}"
    assert agent.get(f"/task/{task_id}").json()["node_id"] == node_id


def test_unknown_task_id_exits_67(agent):
    unknown = "0000000000000000000000-nosuchnode"
    for argv in (["status", unknown], ["logs", unknown], ["logs", "--follow", unknown],
                 ["cancel", unknown]):
        code, _, err = finished(cli(agent.url, *argv))
        assert code == 67, (argv, err)
        assert b"no task" in err


def test_global_options_before_the_subcommand(agent):
    task = agent.run_task("true")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OXIDE_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    listing = subprocess.run([sys.executable, "-m", "oxide_cluster.cli", "--node", agent.url,
                              "--secret", SECRET, "tasks"], env=env, capture_output=True,
                             timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert task["id"].encode() in listing.stdout


@pytest.fixture
def two_nodes(redis, meshed):
    return meshed(2, ("--redis", redis.url), leader=True)


def test_run_and_logs_follow_exit_75_when_the_tasks_node_is_killed(two_nodes):
    leader_id = two_nodes[0].get("/api/cluster/leader").json()["node_id"]
    victim = next(n for n in two_nodes if n.get("/health").json()["node_id"] != leader_id)
    survivor = next(n for n in two_nodes if n is not victim)
    victim_id = victim.get("/health").json()["node_id"]
    run = cli(survivor.url, "run", "--node-id", victim_id, "--",
              "sh", "-c", "echo started; sleep 300")
    task_id = ""
    try:
        assert run.stderr is not None and run.stdout is not None
        match = TASK_LINE.match(run.stderr.readline().rstrip(b"\n"))
        assert match is not None and match.group(2).decode() == victim_id
        task_id = match.group(1).decode()
        assert run.stdout.readline() == b"started\n"
        follow = cli(survivor.url, "logs", "--follow", task_id)
        assert follow.stdout is not None and follow.stdout.readline() == b"started\n"
        victim.kill()  # SIGKILL: the node and its agent die mid-task
        killed_at = time.monotonic()
        code, _, err = finished(run, timeout=60)
        print(f"\nrun exited {code} {time.monotonic() - killed_at:.1f}s after kill -9")
        assert code == 75, err
        assert b"lost" in err and victim_id.encode() in err
        code, _, err = finished(follow, timeout=60)
        assert code == 75, err
    finally:
        run.kill()
        for process in task_processes(task_id) if task_id else []:
            process.kill()  # the orphaned sleep of the killed agent


def test_run_rides_out_a_redis_restart(meshed, redis):
    """While Redis is down a submit is refused 503 ``queue_unavailable`` (nothing taken):
    ``run`` says so, submits again, and runs the task once Redis is back."""
    node, = meshed(1, ("--redis", redis.url), leader=True)
    redis.kill()
    poll_until(lambda: node.post("/execute", {"command": "true"}).status == 503, 10,
               message="submits refused while Redis is down")
    process = cli(node.url, "run", "--", "sh", "-c", "echo ran")
    lines: queue.Queue[bytes] = queue.Queue()
    assert process.stderr is not None
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr],
                     daemon=True).start()
    seen = b""
    while b"not taken (queue_unavailable" not in seen:
        seen = lines.get(timeout=30)
    assert b"submitting again in" in seen, seen
    redis.start()
    code, out, _ = finished(process, timeout=60)
    assert code == 0 and out == b"ran\n", (code, out)

"""``oxide-cluster run`` on a busy node: it waits in the queue and says so."""

from __future__ import annotations

import re

from tests.integration.test_cli import cli, finished
from tests.support import http, poll_until


def _occupy(agent) -> str:
    """Fill the node's one slot with a task that runs until cancelled."""
    blocker = http("POST", agent.url + "/execute", {"command": "sleep", "args": ["300"]})
    assert blocker.status == 202, blocker
    return blocker.json()["id"]


def test_runs_wait_in_the_queue_say_their_place_and_all_succeed(agent_factory):
    agent = agent_factory(extra_args=("--max-tasks", "1"))
    blocker = _occupy(agent)
    runs = [cli(agent.url, "run", "--group", "pipeline", "--", "sh", "-c", f"echo run{index}")
            for index in range(3)]
    # All three are queued behind the blocker before it goes.
    poll_until(lambda: len(http("GET", agent.url + "/queue").json()["tasks"]) == 3, 20,
               message="three queued tasks")
    assert http("POST", agent.url + f"/task/{blocker}/cancel").status in (200, 202)
    for index, run in enumerate(runs):
        code, out, err = finished(run, timeout=60)
        assert code == 0, err
        assert out == f"run{index}\n".encode(), out
        assert re.search(rb"^oxide-cluster: queued: \d+ ahead$", err, re.MULTILINE), err
        assert b"oxide-cluster: started on node " in err, err


def test_a_queue_timeout_exits_69_saying_it_waited(agent_factory):
    agent = agent_factory(extra_args=("--max-tasks", "1"))
    _occupy(agent)
    code, _, err = finished(cli(agent.url, "run", "--queue-timeout", "0.5", "--", "true"),
                            timeout=30)
    assert code == 69, err
    assert b"rejected" in err and b"queue" in err, err


def test_no_queue_fails_at_once_with_69(agent_factory):
    agent = agent_factory(extra_args=("--max-tasks", "1"))
    _occupy(agent)
    code, _, err = finished(cli(agent.url, "run", "--no-queue", "--", "true"), timeout=30)
    assert code == 69, err
    assert b"busy" in err, err


def test_priority_and_group_reach_the_task(agent_factory):
    agent = agent_factory(extra_args=("--max-tasks", "1"))
    _occupy(agent)
    run = cli(agent.url, "run", "--priority", "7", "--group", "nightly", "--", "true")
    queued = poll_until(lambda: http("GET", agent.url + "/queue").json()["tasks"], 20,
                        message="the task to be queued")
    assert (queued[0]["priority"], queued[0]["group"]) == (7, "nightly")
    run.kill()
    run.wait(10)

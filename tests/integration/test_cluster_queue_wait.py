"""``?wait`` on a task queued in a Redis cluster: real twistd nodes and a real redis-server.

The pool for ``pool=solo`` is one node with one slot; a blocker holds it. A task queued
behind it, submitted with ``?wait=30`` on the other node, must answer 200 with its exit
code once the blocker ends, with no polling by the client.
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from tests.integration.test_cluster_queue import TERMINAL, final_state, node_id
from tests.support import AgentProcess, loopback_cluster, poll_until, start_meshed, stop_all


@pytest.fixture
def solo_pool(tmp_path, redis, request):
    nodes = loopback_cluster(tmp_path, 2, ("--redis", redis.url, "--max-tasks", "1"))
    nodes[0].extra_args = (*nodes[0].extra_args, "--labels", "pool=solo")
    try:
        start_meshed(nodes)
        poll_until(lambda: any(n.get("/api/cluster/leader").json()["node_id"] == node_id(n)
                               for n in nodes), timeout=20, message="a node that leads")
        yield nodes
    finally:
        report = getattr(request.node, "rep_call", None)
        stop_all(nodes, report is None or report.failed)


def still_pending(future: concurrent.futures.Future, seconds: float) -> bool:
    done, _ = concurrent.futures.wait([future], timeout=seconds)
    return not done


def test_a_queued_submit_with_wait_answers_200_with_its_exit_code_once_it_ends(
        solo_pool: list[AgentProcess], tmp_path):
    solo, other = solo_pool
    release = tmp_path / "release"
    blocker = {"command": "sh", "args": ["-c", f"while [ ! -e {release} ]; do sleep 0.05; done"],
               "labels": {"pool": "solo"}}
    held = other.post("/execute", blocker)
    assert held.status == 202, held
    blocker_id = held.json()["id"]
    try:
        poll_until(lambda: solo.get(f"/task/{blocker_id}").json()["state"] == "running",
                   timeout=20, message="the blocker to run on the solo node")
        failing = {"command": "sh", "args": ["-c", "exit 3"], "labels": {"pool": "solo"}}

        # A short wait on a queued task answers 202 queued when the wait ends, not before.
        started = time.monotonic()
        short = other.post("/execute?wait=1", {"command": "true", "labels": {"pool": "solo"}})
        assert short.status == 202 and short.json()["state"] == "queued", short
        assert time.monotonic() - started >= 0.9

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            submitted = pool.submit(other.post, "/execute?wait=30", failing, timeout=60)
            queued = poll_until(lambda: [t["id"] for t in other.get("/queue").json()["tasks"]
                                         if t["id"] != short.json()["id"]],
                                timeout=10, message="the waited-on task in the queue")
            [waited_id] = queued
            # The node it will run on, asked with a wait while it is queued.
            looked_up = pool.submit(solo.get, f"/task/{waited_id}?wait=30", timeout=60)
            assert still_pending(submitted, 1.5) and still_pending(looked_up, 0.1)
            release.touch()
            reply = submitted.result(timeout=40)
            lookup = looked_up.result(timeout=40)
    finally:
        release.touch()
    assert reply.status == 200, reply
    task = reply.json()
    assert task["id"] == waited_id
    assert task["state"] == "failed" and task["exit_code"] == 3, task
    assert task["node_id"] == node_id(solo)
    assert lookup.status == 200 and lookup.json()["exit_code"] == 3, lookup
    ended = poll_until(lambda: final_state(solo_pool, short.json()["id"]), timeout=30,
                       message="the short-wait task to end")
    assert ended["state"] in TERMINAL and ended["state"] == "succeeded"

"""Random ``POST /execute`` bodies through real HTTP to a live node: 2xx/4xx, never 5xx.

The node runs real commands, so any body whose ``command`` it could run is rewritten to
``true``; bodies it must refuse stay as generated. Two slots and a 5 s timeout bound it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.strategies import JSON, PLAUSIBLE_BODIES, TASK_FIELDS
from tests.support import AgentProcess, poll_until

ACCEPTED = {200, 202, 429, 503}  # ran (or ended at once), or refused for capacity
REFUSED = {400, 413, 415}
UNSCHEDULABLE = {422}  # labels or declared resources no known node could ever hold


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path_factory.mktemp("http-fuzz") / "node",
                         extra_args=("--max-tasks", "2", "--default-timeout", "5",
                                     "--max-timeout", "5", "--max-body", "65536"))
    agent.start()
    yield agent
    agent.terminate()
    if "Traceback" in agent.log_text():
        print(f"\n===== log of {agent.name} =====\n{agent.log_text()}")


def _runnable(command: object) -> bool:
    return isinstance(command, str) and bool(command) and "\x00" not in command \
        and not any(0xD800 <= ord(c) <= 0xDFFF for c in command)


def _tame(body: object) -> object:
    if isinstance(body, dict) and _runnable(body.get("command")):
        return {**body, "command": "true"}
    return body


def _post(node: AgentProcess, raw: bytes, content_type: str = "application/json") -> int:
    reply = node.post("/execute?wait=0", raw=raw, headers={"Content-Type": content_type})
    assert reply.status < 500, reply
    if reply.status >= 400:
        assert set(reply.json()["error"]) == {"code", "message"}
    return reply.status


BODIES = PLAUSIBLE_BODIES | st.dictionaries(TASK_FIELDS, JSON, max_size=6) | JSON


@given(body=BODIES)
@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_random_json_bodies_are_answered_2xx_or_4xx(node, body) -> None:
    assert _post(node, json.dumps(_tame(body)).encode()) in ACCEPTED | REFUSED | UNSCHEDULABLE


@given(raw=st.binary(max_size=300)
       | st.integers(1, 60_000).map(lambda depth: b"[" * depth)
       | st.integers(1, 20_000).map(lambda depth: b'{"a":' * depth),
       content_type=st.sampled_from(["application/json", "application/json; charset=latin-1",
                                     "text/plain", ""]))
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_random_bytes_and_deep_nesting_are_refused(node, raw, content_type) -> None:
    assert _post(node, raw, content_type) in REFUSED


def test_node_still_runs_tasks_after_the_fuzzing(node) -> None:
    """Refused or failed requests must not leak slots: a plain ``true`` still runs."""
    reply = poll_until(lambda: (lambda r: r if r.status == 200 else None)(
        node.post("/execute?wait=10", {"command": "true"})), timeout=20,
        message="a free slot after the fuzzing")
    assert reply.json()["state"] == "succeeded"
    assert "Traceback" not in node.log_text()

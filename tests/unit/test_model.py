from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oxide_cluster.model import RequestError, Task, TaskState, parse_task_request, rfc3339


def parse(body):
    return parse_task_request(body, max_timeout=600)


def test_minimal_request():
    request = parse({"command": "true"})
    assert request.command == "true"
    assert request.args == ()
    assert request.timeout is None


@pytest.mark.parametrize(("body", "field"), [
    ({}, "command"),
    ({"command": ""}, "command"),
    ({"command": 3}, "command"),
    ({"command": "ls", "args": "x"}, "args"),
    ({"command": "ls", "args": [1]}, "args[0]"),
    ({"command": "ls", "cwd": "relative"}, "cwd"),
    ({"command": "ls", "env": {"A": 1}}, "env.A"),
    ({"command": "ls", "env": {"A=B": "1"}}, "env.A=B"),
    ({"command": "ls", "timeout": 0}, "timeout"),
    ({"command": "ls", "timeout": 601}, "timeout"),
    ({"command": "ls", "timeout": True}, "timeout"),
    ({"command": "ls", "retries": -1}, "retries"),
    ({"command": "ls", "retries": 1.5}, "retries"),
    ({"command": "ls", "tty": 1}, "tty"),
    ({"command": "ls", "tty": "yes"}, "tty"),
    ({"command": "ls", "args": ["\ud800"]}, "args[0]"),
    ({"command": "ls", "env": {"\udfff": "x"}}, "env.\udfff"),
    ({"command": "ls", "comand": "x"}, "comand"),
    ({"command": "ls", "env": {"K": "1"}, "secret_env": {"K": "2"}}, "secret_env.K"),
    ([], "body"),
])
def test_bad_requests_name_the_field(body, field):
    with pytest.raises(RequestError) as caught:
        parse(body)
    assert caught.value.field == field


def test_secret_env_is_not_in_repr():
    request = parse({"command": "ls", "secret_env": {"TOKEN": "hunter2"}})
    assert "hunter2" not in repr(request)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(
    st.sampled_from(["command", "args", "cwd", "env", "secret_env", "timeout",
                     "idle_timeout", "labels", "node", "retries", "tty", "priority",
                     "group", "queue_timeout", "queue", "workspace", "artifacts",
                     "source", "resources", "other"]),
    json_values, max_size=6))
def test_any_json_body_parses_or_raises_request_error(body):
    try:
        request = parse(body)
    except RequestError as error:
        assert error.field
    else:
        assert isinstance(request.command, str) and request.command


def test_task_json_has_contract_fields_and_no_env():
    task = Task(id="t1", node_id="n1", command="ls", args=[], cwd=None,
                env={"PUBLIC": "x"}, secret_env_keys=["TOKEN"], labels={}, timeout=5,
                idle_timeout=None, retries=0, created_at=0.0)
    body = task.to_json()
    for field in ("id", "node_id", "state", "command", "args", "cwd", "labels", "exit_code",
                  "signal", "reason", "created_at", "started_at", "finished_at", "attempt",
                  "retry_of", "output_bytes"):
        assert field in body
    assert "env" not in body and "TOKEN" not in json.dumps(body)
    assert body["created_at"] == "1970-01-01T00:00:00.000Z"
    assert body["state"] == "queued"


def test_terminal_states():
    assert not TaskState.RUNNING.terminal and not TaskState.QUEUED.terminal
    assert all(state.terminal for state in TaskState
               if state not in (TaskState.RUNNING, TaskState.QUEUED))
    assert rfc3339(None) is None


def test_an_integral_float_is_a_whole_number_of_retries():
    """JSON has one number type; the OpenAPI document (JSON Schema) calls 3.0 an integer."""
    assert parse({"command": "ls", "retries": 3.0}).retries == 3


def test_tty_is_a_boolean_kept_in_the_task_json():
    assert parse({"command": "ls"}).tty is False
    assert parse({"command": "ls", "tty": True}).tty is True
    task = Task(id="t1", node_id="n1", command="ls", args=[], cwd=None, env={},
                secret_env_keys=[], labels={}, timeout=5, idle_timeout=None, retries=0,
                tty=True)
    assert task.to_json()["tty"] is True


def test_resources_are_parsed_and_bad_ones_name_the_field():
    from oxide_cluster.cgroups import Resources
    request = parse_task_request({"command": "x", "resources": {"cpus": 1.5, "memory": "2G",
                                                                "pids": 512}}, 60)
    assert request.resources == Resources(cpus=1.5, memory=2 * 1024 ** 3, pids=512)
    assert parse_task_request({"command": "x"}, 60).resources is None
    with pytest.raises(RequestError) as caught:
        parse_task_request({"command": "x", "resources": {"memory": "2 potatoes"}}, 60)
    assert caught.value.field == "resources.memory"

"""Hostile input to the parsers not covered elsewhere: WebSocket frames and task requests.

Discovery datagrams and config files have their own property tests (test_wire.py,
test_discovery.py, test_config.py); ``POST /execute`` through real HTTP is fuzzed in
tests/integration/test_fuzz_http.py.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from oxide_cluster.model import RequestError, TaskRequest, parse_task_request
from oxide_cluster.ws import Command, CommandError, parse_command
from tests.strategies import JSON, PLAUSIBLE_BODIES, TASK_FIELDS

VALID_FRAMES = st.sampled_from([
    {"op": "attach", "task": "0123-node", "offset": 0},
    {"op": "attach", "task": "t"},
    {"op": "detach", "task": "0123-node"},
    {"op": "subscribe", "topic": "cluster"},
])
KEYS = st.sampled_from(["op", "task", "offset", "topic", "extra", ""])


@st.composite
def mutated_frames(draw) -> dict:
    """A valid command with one field replaced, added or removed."""
    frame = dict(draw(VALID_FRAMES))
    key = draw(KEYS)
    if draw(st.booleans()) and key in frame:
        del frame[key]
    else:
        frame[key] = draw(JSON)
    return frame


def _parse(payload: bytes, binary: bool = False) -> Command | None:
    """parse_command may only answer a Command or raise CommandError."""
    try:
        command = parse_command(payload, binary)
    except CommandError as error:
        assert str(error)
        return None
    assert command.op in ("attach", "detach", "subscribe")
    return command


@given(st.binary(max_size=200), st.booleans())
def test_ws_random_bytes_are_a_command_or_a_command_error(payload: bytes, binary: bool) -> None:
    _parse(payload, binary)


@given(JSON)
def test_ws_random_json_is_a_command_or_a_command_error(body) -> None:
    _parse(json.dumps(body).encode())


@given(mutated_frames())
def test_ws_mutated_commands_are_a_command_or_a_command_error(frame: dict) -> None:
    command = _parse(json.dumps(frame).encode())
    if command is not None and command.op != "subscribe":
        assert isinstance(command.task, str) and 0 <= command.offset < 2**62


@given(st.integers(1, 200_000), st.sampled_from([b"[", b'{"a":']))
@settings(max_examples=20)
def test_ws_deeply_nested_frames_are_refused(depth: int, opener: bytes) -> None:
    assert _parse(opener * depth) is None or depth < 2


def test_ws_valid_commands_parse() -> None:
    assert _parse(b'{"op":"attach","task":"x","offset":5}') == Command("attach", "x", 5)
    assert _parse(b'{"op":"subscribe","topic":"cluster"}') == Command("subscribe",
                                                                     topic="cluster")


@given(PLAUSIBLE_BODIES | st.dictionaries(TASK_FIELDS, JSON, max_size=6) | JSON)
def test_task_request_parser_answers_a_request_or_a_request_error(body) -> None:
    """Whatever it accepts, argv, environ and SQLite can take (UTF-8, no NUL)."""
    try:
        request = parse_task_request(body, max_timeout=3600)
    except RequestError as error:
        assert error.message
        return
    assert isinstance(request, TaskRequest)
    texts = [request.command, *request.args, request.cwd or "", request.node or "",
             *request.env, *request.env.values(), *request.secret_env,
             *request.secret_env.values(), *request.labels, *request.labels.values(),
             *([request.fanout["run"], request.fanout["mode"]] if request.fanout else [])]
    for text in texts:
        assert "\x00" not in text
        text.encode("utf-8")

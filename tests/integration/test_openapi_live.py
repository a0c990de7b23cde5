"""schemathesis against a live ``twistd`` node: no 5xx, every answer as the document says.

Bounded so it stays a regular test: a few examples per operation, each operation's run
capped in time, one node for the whole module. The node runs real commands, so it runs
with two slots and a 5 s default timeout, and every generated ``command`` string is
replaced by ``true`` (bodies whose ``command`` is not a string stay as generated: they must
be refused with 400) and generated ``labels`` are dropped (the node has none).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode

from tests.support import SECRET, AgentProcess

MAX_EXAMPLES = 25
# Wall-clock budget per operation (hypothesis stops generating once it is spent).
BUDGET_PER_OPERATION = 4.0
AUTH = {"X-Cluster-Secret": SECRET}


@pytest.fixture(scope="module")
def live_node(tmp_path_factory) -> Iterator[AgentProcess]:
    node = AgentProcess(tmp_path_factory.mktemp("fuzzed") / "node",
                        extra_args=("--max-tasks", "2", "--default-timeout", "5",
                                    "--max-timeout", "5"))
    node.start()
    yield node
    failed = node.process is not None and node.process.poll() is not None
    node.terminate()
    if failed:
        print(f"\n===== log of {node.name} =====\n{node.log_text()}")


@pytest.fixture(scope="module")
def live_schema(live_node):
    """The document as the live node serves it (so serving it is tested too)."""
    schema = schemathesis.openapi.from_url(live_node.url + "/openapi.json")
    schema.config.update(base_url=live_node.url, request_timeout=15)
    schema.config.generation.update(modes=list(GenerationMode), max_examples=MAX_EXAMPLES,
                                    allow_x00=True)
    return schema


schema = schemathesis.pytest.from_fixture("live_schema")


def _tame(case) -> None:
    """Never run anything but ``true``; the rest of the body stays as generated, and so does
    a ``command`` the document forbids (not a string, empty, NUL, too long): it must be
    refused with 400."""
    command = case.body.get("command") if isinstance(case.body, dict) else None
    if isinstance(command, str) and 0 < len(command) <= 65536 and "\x00" not in command:
        case.body["command"] = "true"
    if isinstance(case.body, dict) and isinstance(case.body.get("env"), dict) \
            and isinstance(case.body.get("secret_env"), dict):
        # A name in both is refused (400); JSON Schema cannot say so, the description does.
        for name in set(case.body["env"]) & set(case.body["secret_env"]):
            del case.body["secret_env"][name]
    if isinstance(case.body, dict) and isinstance(case.body.get("workspace"), str) \
            and isinstance(case.body.get("cwd"), str) and case.body["cwd"].startswith("/"):
        # With a workspace, cwd is relative to it (the description says so).
        case.body["cwd"] = case.body["cwd"].lstrip("/") or "."
    if case.operation.label == "PUT /cas/{digest}" and isinstance(case.body, bytes | str) \
            and _valid_digest(case.path_parameters.get("digest")):
        if isinstance(case.body, str):
            case.body = case.body.encode()
        # Random bytes never hash to a random digest: name them by their own, so a valid
        # upload is tried (a wrong one is checked in tests/integration/test_workspace.py).
        case.path_parameters["digest"] = hashlib.sha256(case.body).hexdigest()
    labels = case.body.get("labels") if isinstance(case.body, dict) else None
    if isinstance(labels, dict) and all(_valid_text(k, 1) and _valid_text(v, 0)
                                        for k, v in labels.items()):
        # The node has no labels: valid ones asked for are refused 422 unschedulable
        # (documented; tests/integration/test_queue.py checks it), which says nothing
        # about the rest. Invalid ones stay: they must be refused with 400.
        case.body["labels"] = {}


def _valid_digest(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch("[0-9a-f]{64}", value) is not None


def _valid_text(value: object, minimum: int) -> bool:
    return isinstance(value, str) and minimum <= len(value) <= 65536 and "\x00" not in value


@schema.exclude(path="/ws").parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case, live_node) -> None:
    """/ws is excluded: it is an upgrade endpoint (tests/integration/test_live.py covers it,
    and tests/integration/test_security.py checks its refusals)."""
    started = getattr(test_api_conforms_to_its_openapi_document, "_started", {})
    first = started.setdefault(case.operation.label, time.monotonic())
    test_api_conforms_to_its_openapi_document._started = started  # type: ignore[attr-defined]
    if time.monotonic() - first > BUDGET_PER_OPERATION:
        return
    _tame(case)
    headers = dict(AUTH) if case.operation.path not in ("/health", "/openapi.json") else {}
    case.call_and_validate(headers=headers)
    assert live_node.process is not None and live_node.process.poll() is None, "node died"

"""``run --parallel``: a shard whose task is lost is followed into the retry the cluster
placed for it (same prefix, its exit code); lost with no retry left, it fails as lost."""

from __future__ import annotations

import base64
import io
import threading

from oxide_cluster import fanout
from oxide_cluster.cli import EXIT_LOST
from oxide_cluster.client import NodeError
from oxide_cluster.fanout import Shard, ShardOutput, _run_shard, find_retry


def _output(text: str, offset: int = 0) -> dict:
    return {"type": "output", "stream": "stdout", "offset": offset,
            "data": base64.b64encode(text.encode()).decode(), "encoding": "base64"}


class FakeWebSocket:
    def __init__(self, node: FakeNode) -> None:
        self._node = node
        self._task: str | None = None

    def send_json(self, message: dict) -> None:
        assert message["op"] == "attach"
        self._task = message["task"]

    def messages(self):
        assert self._task is not None
        yield from self._node.streams[self._task]

    def close(self) -> None:
        pass


class FakeNode:
    """The cluster as ``GET /task``, ``GET /tasks`` and the WebSocket show it."""

    url = "http://fake"

    def __init__(self, tasks: dict[str, dict], streams: dict[str, list[dict]],
                 listed: list[dict] | None = None) -> None:
        self.tasks = tasks
        self.streams = streams
        self.listed = listed or []
        self.requests: list[str] = []

    def request(self, method: str, path: str, body=None, timeout=None) -> dict:
        self.requests.append(path)
        if path.startswith("/tasks?"):
            return {"tasks": self.listed}
        task_id = path.removeprefix("/task/")
        if task_id not in self.tasks:
            raise NodeError(404, "not_found", f"no task {task_id}")
        return dict(self.tasks[task_id])

    def websocket(self) -> FakeWebSocket:
        return FakeWebSocket(self)


def _task(task_id: str, state: str, **fields) -> dict:
    return {"id": task_id, "node_id": "n-" + task_id, "state": state, "exit_code": None,
            "signal": None, "reason": None, "retries": 0, "attempt": 1, "retry_of": None,
            **fields}


LOST = "node n-a died while the task was running"
DEAD = {"type": "error", "message": "node n-a is not reachable"}


def _run(node: FakeNode, first: str) -> tuple[Shard, bytes]:
    shard = Shard(1, 3, [], task_id=first, node_id="n-" + first)
    target = io.BytesIO()
    lock = threading.Lock()
    out = ShardOutput(target, b"[2/3] ", lock)
    err = ShardOutput(target, b"[2/3] ", lock)
    _run_shard(node, shard, {"id": first, "state": "running"}, out, err, None)  # type: ignore[arg-type]
    return shard, target.getvalue()


def test_a_lost_shard_is_followed_into_its_retry_with_the_same_prefix_and_its_code():
    node = FakeNode(
        {"a": _task("a", "lost", retries=1, reason=LOST, retried_by="b"),
         "b": _task("b", "failed", exit_code=3, attempt=2, retry_of="a")},
        {"a": [_output("first try\n"), DEAD],
         "b": [_output("second try\n"),
               {"type": "state", "task": "b", "state": "failed", "exit_code": 3,
                "signal": None, "reason": None}]})
    shard, written = _run(node, "a")
    assert written == b"[2/3] first try\n[2/3] second try\n"
    assert (shard.task_id, shard.node_id, shard.lost) == ("b", "n-b", ["a"])
    assert (shard.code, shard.state) == (3, "failed")


def test_a_retry_not_named_on_the_lost_record_is_found_by_its_retry_of():
    # A restarted owner answers for its own lost task, without ``retried_by``.
    node = FakeNode(
        {"a": _task("a", "lost", retries=2, reason=LOST),
         "b": _task("b", "succeeded", exit_code=0, attempt=2, retry_of="a")},
        {"a": [DEAD], "b": [{"type": "state", "task": "b", "state": "succeeded",
                             "exit_code": 0, "signal": None, "reason": None}]},
        listed=[_task("c", "running", retry_of="x"), _task("b", "running", retry_of="a")])
    shard, _ = _run(node, "a")
    assert (shard.task_id, shard.code, shard.lost) == ("b", 0, ["a"])


def test_a_shard_lost_with_no_retry_left_fails_as_lost_after_its_retries():
    node = FakeNode(
        {"a": _task("a", "lost", retries=1, reason=LOST, retried_by="b"),
         "b": _task("b", "lost", retries=0, reason=LOST, attempt=2, retry_of="a")},
        {"a": [DEAD], "b": [_output("again\n"), DEAD]})
    shard, written = _run(node, "a")
    assert written == b"[2/3] again\n"
    assert (shard.task_id, shard.lost, shard.state, shard.code) == \
        ("b", ["a"], "lost", EXIT_LOST)
    assert shard.reason == LOST
    # No retries left: nobody waits for a retry that cannot come.
    assert fanout.RETRY_SEARCH not in node.requests


def test_find_retry_waits_for_the_leader_to_name_the_retry():
    lost = _task("a", "lost", retries=1, reason=LOST)
    node = FakeNode({"a": lost}, {})
    now = [0.0]

    def pause(seconds: float) -> None:
        now[0] += seconds
        if now[0] >= 2.0:  # the leader placed it meanwhile
            node.tasks["a"] = {**lost, "retried_by": "b"}
    assert find_retry(node, lost, wait=30, clock=lambda: now[0], pause=pause) == "b"  # type: ignore[arg-type]
    assert now[0] == 2.0


def test_find_retry_gives_up_after_its_wait_and_never_waits_when_not_retried():
    lost = _task("a", "lost", retries=1, reason=LOST)
    node = FakeNode({"a": lost}, {})
    now = [0.0]

    def pause(seconds: float) -> None:
        now[0] += seconds
    assert find_retry(node, lost, wait=5, clock=lambda: now[0], pause=pause) is None  # type: ignore[arg-type]
    assert 5.0 < now[0] <= 5.0 + fanout.RETRY_POLL
    secret = {**lost, "reason": LOST + "; not retried: secret_env values are never kept"}
    assert find_retry(node, secret, clock=lambda: now[0], pause=pause) is None  # type: ignore[arg-type]
    assert find_retry(node, {**lost, "retries": 0}) is None  # type: ignore[arg-type]

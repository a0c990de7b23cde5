"""LiveHub/LiveSession driven directly: replay and live output meet without gap or dup."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet import defer

from oxide_cluster.client import decode_output
from oxide_cluster.model import Task, TaskState
from oxide_cluster.ws import (
    CLOSE_POLICY,
    CLOSE_SLOW_CONSUMER,
    MAX_BAD_FRAMES,
    CommandError,
    LiveHub,
    authorized,
    parse_command,
)


def make_task(task_id: str = "t1", state: TaskState = TaskState.RUNNING) -> Task:
    return Task(id=task_id, node_id="n", command="sh", args=[], cwd=None, env={},
                secret_env_keys=[], labels={}, timeout=10, idle_timeout=None, retries=0,
                state=state)


class FakeStore:
    """FIFO like the real store: an operation sees every write queued before it."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[tuple[int, str, bytes]]] = {}
        self.tasks: dict[str, Task] = {}
        self.queue: list[tuple[Any, defer.Deferred[Any]]] = []

    def append_output(self, task_id: str, offset: int, stream: str, data: bytes) -> None:
        self.queue.append((lambda: self.chunks.setdefault(task_id, []).append(
            (offset, stream, data)), defer.Deferred()))

    def read_output(self, task_id: str, offset: int, limit: int) -> defer.Deferred[Any]:
        def select() -> list[tuple[int, str, bytes]]:
            found, total = [], 0
            for start, stream, data in self.chunks.get(task_id, []):
                if start + len(data) > offset:
                    found.append((start, stream, data))
                    total += len(data)
                    if total >= limit:
                        break
            return found
        done: defer.Deferred[Any] = defer.Deferred()
        self.queue.append((select, done))
        return done

    def get_task(self, task_id: str) -> defer.Deferred[Any]:
        done: defer.Deferred[Any] = defer.Deferred()
        self.queue.append((lambda: self.tasks.get(task_id), done))
        return done

    def run(self) -> None:
        while self.queue:
            operation, done = self.queue.pop(0)
            done.callback(operation())


class FakeExecutor:
    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.output_listeners: list[Any] = []
        self.state_listeners: list[Any] = []
        self.runs: dict[str, Task] = {}
        self.offsets: dict[str, int] = {}

    def live_task(self, task_id: str) -> Task | None:
        return self.runs.get(task_id)

    def start(self, task: Task) -> None:
        self.runs[task.id] = task
        self.offsets[task.id] = 0
        for listener in self.state_listeners:
            listener(task)

    def write(self, task: Task, data: bytes, stream: str = "stdout") -> None:
        """Like Executor._output: the store write is queued before listeners run."""
        offset = self.offsets[task.id]
        self.offsets[task.id] += len(data)
        task.output_bytes = self.offsets[task.id]
        self.store.append_output(task.id, offset, stream, data)
        for listener in self.output_listeners:
            listener(task, offset, stream, data)

    def finish(self, task: Task, exit_code: int) -> None:
        del self.runs[task.id]
        task.state = TaskState.SUCCEEDED if exit_code == 0 else TaskState.FAILED
        task.exit_code = exit_code
        self.store.tasks[task.id] = task
        for listener in self.state_listeners:
            listener(task)


class FakeSink:
    def __init__(self) -> None:
        self.paused = False
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    def send_text(self, payload: bytes) -> None:
        self.sent.append(json.loads(payload))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def output(self, task_id: str = "t1") -> bytes:
        """The streamed bytes, checking each message starts where the last one ended."""
        data = b""
        for message in self.sent:
            if message["type"] == "output" and message["task"] == task_id:
                assert message["offset"] == len(data), (message["offset"], len(data))
                data += decode_output(message)
        return data

    def types(self) -> list[str]:
        return [message["type"] for message in self.sent]


@pytest.fixture
def node() -> tuple[LiveHub, FakeExecutor, FakeStore]:
    store = FakeStore()
    executor = FakeExecutor(store)
    hub = LiveHub(executor, store, read_size=8, live_buffer=16, max_pending=200)
    hub.startService()
    return hub, executor, store


def attach(hub: LiveHub, offset: int = 0, task_id: str = "t1") -> tuple[Any, FakeSink]:
    sink = FakeSink()
    session = hub.open_session(sink)
    session.received(json.dumps({"op": "attach", "task": task_id, "offset": offset}).encode(),
                     False)
    return session, sink


def test_attach_racing_with_writes_gets_every_byte_once(node) -> None:
    hub, executor, store = node
    task = make_task()
    executor.start(task)
    executor.write(task, b"aaaa")
    executor.write(task, b"bbbb")
    store.run()
    executor.write(task, b"cccc")  # queued, not yet committed, when the attach reads
    _, sink = attach(hub)
    executor.write(task, b"dddd")  # after the read was queued: must come live, once
    executor.write(task, b"eeee")
    store.run()
    executor.write(task, b"ffff")
    executor.finish(task, 3)
    store.run()
    assert sink.output() == b"aaaabbbbccccddddeeeeffff"
    assert sink.types()[0] == "attached"
    assert sink.sent[-1] == {"type": "state", "task": "t1", "state": "failed",
                             "exit_code": 3, "signal": None, "reason": None,
                             "output_bytes": 24}
    assert "live" in sink.types()


def test_two_clients_get_identical_streams(node) -> None:
    hub, executor, store = node
    task = make_task()
    executor.start(task)
    executor.write(task, b"12345")
    _, first = attach(hub)
    store.run()
    executor.write(task, b"678")
    _, second = attach(hub)
    executor.write(task, b"90")
    store.run()
    executor.finish(task, 0)
    store.run()
    assert first.output() == second.output() == b"1234567890"


def test_attach_with_offset_inside_a_chunk_resumes_exactly(node) -> None:
    hub, executor, store = node
    task = make_task()
    executor.start(task)
    executor.write(task, b"abcdef")
    executor.write(task, b"ghij")
    executor.finish(task, 0)
    store.run()
    _, sink = attach(hub, offset=4)
    store.run()
    messages = [m for m in sink.sent if m["type"] == "output"]
    assert messages[0]["offset"] == 4
    assert b"".join(decode_output(m) for m in messages) == b"efghij"
    assert sink.types()[-1] == "state"


def test_finished_task_replays_then_sends_state(node) -> None:
    hub, executor, store = node
    task = make_task()
    executor.start(task)
    executor.write(task, b"x" * 30)  # more than one read (read_size 8)
    executor.finish(task, 0)
    store.run()
    _, sink = attach(hub)
    store.run()
    assert sink.output() == b"x" * 30
    assert sink.types()[-2:] == ["live", "state"]
    assert hub._attached == {}


def test_unknown_task_gets_an_error(node) -> None:
    hub, _, store = node
    session, sink = attach(hub, task_id="nope")
    store.run()
    assert sink.sent == [{"type": "error", "message": "no task 'nope' on this node",
                          "task": "nope"}]
    assert session.attachments == {}


def test_binary_output_is_base64(node) -> None:
    hub, executor, store = node
    task = make_task()
    executor.start(task)
    _, sink = attach(hub)
    store.run()
    executor.write(task, b"\xff\xfe\x00ok", "stderr")
    message = sink.sent[-1]
    assert (message["encoding"], message["stream"]) == ("base64", "stderr")
    assert decode_output(message) == b"\xff\xfe\x00ok"


def test_paused_client_catches_up_from_the_store_without_buffering(node) -> None:
    hub, executor, store = node
    task = make_task()
    executor.start(task)
    session, sink = attach(hub)
    store.run()
    sink.paused = True
    for _ in range(100):
        executor.write(task, b"0123456789")  # 1000 bytes, far over every bound
    store.run()
    assert sink.output() == b""
    assert sink.closed is None
    attachment = session.attachments["t1"]
    assert attachment._buffer == [] and not attachment.live
    sink.paused = False
    session.resumed()
    executor.write(task, b"tail")  # arrives while the catch-up read is in flight
    store.run()
    assert sink.output() == b"0123456789" * 100 + b"tail"
    assert attachment.live


def test_live_buffer_overflow_during_a_read_rereads_instead(node) -> None:
    hub, executor, store = node
    task = make_task()
    executor.start(task)
    session, sink = attach(hub)
    for _ in range(10):
        executor.write(task, b"abc")  # 30 bytes while the first read is pending (bound 16)
    assert session.attachments["t1"]._overflowed
    store.run()
    assert sink.output() == b"abc" * 10


def test_events_queued_to_a_paused_client_past_the_bound_drop_it(node) -> None:
    hub, _, _ = node
    sink = FakeSink()
    session = hub.open_session(sink)
    session.received(b'{"op":"subscribe","topic":"cluster"}', False)
    sink.paused = True
    for number in range(20):
        hub.publish({"type": "node", "node_id": f"node-{number}"})
    assert sink.closed is not None and sink.closed[0] == CLOSE_SLOW_CONSUMER
    assert session.closed


def test_cluster_subscribers_see_task_events(node) -> None:
    hub, executor, _ = node
    sink = FakeSink()
    hub.open_session(sink).received(b'{"op":"subscribe","topic":"cluster"}', False)
    task = make_task()
    executor.start(task)
    executor.finish(task, 0)
    events = [(m["type"], m.get("event")) for m in sink.sent]
    assert events == [("subscribed", None), ("task", "started"), ("task", "finished")]


def test_malformed_frames_get_errors_then_a_policy_close(node) -> None:
    hub, _, _ = node
    sink = FakeSink()
    session = hub.open_session(sink)
    bad = [(b"not json", False), (b"\x00\x01", True), (b'{"op":"fly"}', False),
           (b'{"op":"attach","task":5}', False), (b"[1,2]", False),
           (b'{"op":"attach","task":"t","offset":-1}', False)]
    for payload, binary in bad:
        session.received(payload, binary)
    assert sink.types() == ["error"] * len(bad)
    assert sink.closed is None
    for _ in range(MAX_BAD_FRAMES - len(bad)):
        session.received(b"{", False)
    assert sink.closed is not None and sink.closed[0] == CLOSE_POLICY


def test_detach_stops_the_stream(node) -> None:
    hub, executor, store = node
    task = make_task()
    executor.start(task)
    session, sink = attach(hub)
    store.run()
    session.received(b'{"op":"detach","task":"t1"}', False)
    executor.write(task, b"after")
    assert sink.types()[-1] == "detached"
    assert sink.output() == b""
    assert hub._attached == {}


@pytest.mark.parametrize(("payload", "reason"), [
    (b'{"op":"attach"}', "task must be"),
    (b'{"op":"attach","task":"x","offset":true}', "offset must be"),
    (b'{"op":"subscribe","topic":"other"}', "topic must be"),
    (b'{"op":"attach","task":"x","extra":1}', "unknown field 'extra'"),
])
def test_parse_command_names_the_problem(payload: bytes, reason: str) -> None:
    with pytest.raises(CommandError, match=reason):
        parse_command(payload, False)


def test_authorized_accepts_header_bearer_and_token_subprotocol() -> None:
    secret = b"s3cret/+="
    token = "oxide.token.czNjcmV0Lys9"  # base64url of the secret, no padding needed here
    assert authorized({"x-cluster-secret": "s3cret/+="}, [], secret)
    assert authorized({"authorization": "Bearer s3cret/+="}, [], secret)
    assert authorized({}, ["oxide.v1", token], secret)
    assert not authorized({}, ["oxide.v1"], secret)
    assert not authorized({"x-cluster-secret": "wrong"}, [token], secret)
    assert not authorized({}, ["oxide.token.!!!"], secret)


def test_an_attach_waits_for_where_the_task_runs_and_refuses_a_duplicate(node) -> None:
    hub, executor, store = node
    located: defer.Deferred[str | None] = defer.Deferred()

    async def locate(task_id: str) -> str | None:
        return await located
    hub.locate = locate
    task = make_task()
    executor.start(task)
    executor.write(task, b"hello")
    session, sink = attach(hub)
    session.received(json.dumps({"op": "attach", "task": "t1"}).encode(), False)
    assert sink.sent == [{"type": "error", "message": "already attached to task 't1'",
                          "task": "t1"}]
    located.callback(None)  # runs here
    executor.finish(task, 0)
    store.run()
    assert sink.output() == b"hello"
    assert sink.sent[-1]["type"] == "state"


def test_a_failed_look_up_of_where_the_task_runs_is_an_error(node) -> None:
    hub, _, _ = node

    async def locate(task_id: str) -> str | None:
        raise LookupError("redis is away")
    hub.locate = locate
    session, sink = attach(hub)
    assert sink.sent == [{"type": "error", "message": "cannot find where task 't1' runs: "
                                                      "redis is away", "task": "t1"}]
    assert session.attachments == {}

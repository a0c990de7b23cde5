"""Live output over /ws and the oxide-cluster CLI against a real twistd agent."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from oxide_cluster.client import ConnectionClosed, HandshakeError, Node, WebSocket
from oxide_cluster.client import decode_output as decode
from tests.support import REPO_ROOT, SECRET, poll_until

# Prints 2000 numbered lines, half before and half after a file appears.
HALVES = ("for i in $(seq 1 1000); do echo line-$i; done; "
          "while [ ! -e \"$1\" ]; do sleep 0.02; done; "
          "for i in $(seq 1001 2000); do echo line-$i >&2; done")
EXPECTED = b"".join(f"line-{i}\n".encode() for i in range(1, 2001))


def collect(ws: WebSocket, task_id: str) -> tuple[bytes, dict[str, Any], list[dict]]:
    """Read until the task's state message; check offsets are contiguous."""
    data, messages = b"", []
    for message in ws.messages():
        messages.append(message)
        if message["type"] == "output":
            assert message["offset"] == len(data) + messages[0].get("offset", 0)
            data += decode(message)
        elif message["type"] == "state":
            return data, message, messages
        elif message["type"] == "error":
            raise AssertionError(message)
    raise AssertionError("stream ended")


def attach(agent, task_id: str, offset: int = 0) -> WebSocket:
    ws = Node(agent.url, SECRET).websocket(timeout=20)
    ws.send_json({"op": "attach", "task": task_id, "offset": offset})
    return ws


def start_halves(agent, tmp_path) -> tuple[str, Any]:
    go = tmp_path / "go"
    reply = agent.post("/execute", {"command": "sh", "args": ["-c", HALVES, "sh", str(go)]})
    assert reply.status == 202, reply
    task_id = reply.json()["id"]
    poll_until(lambda: agent.get(f"/task/{task_id}").json()["output_bytes"] >= 8893,
               message="the first half of the output")
    return task_id, go


def test_attach_mid_task_gets_all_output_in_order(agent, tmp_path) -> None:
    task_id, go = start_halves(agent, tmp_path)
    ws = attach(agent, task_id)
    go.touch()
    data, state, messages = collect(ws, task_id)
    ws.close()
    assert data == EXPECTED
    assert (state["state"], state["exit_code"]) == ("succeeded", 0)
    streams = {m["stream"] for m in messages if m["type"] == "output"}
    assert streams == {"stdout", "stderr"}


def test_two_clients_attached_at_once_get_identical_streams(agent, tmp_path) -> None:
    task_id, go = start_halves(agent, tmp_path)
    first, second = attach(agent, task_id), attach(agent, task_id, 0)
    go.touch()
    one, two = collect(first, task_id), collect(second, task_id)
    assert one[0] == two[0] == EXPECTED
    assert one[1] == two[1]


def test_attach_with_offset_resumes_exactly(agent) -> None:
    task = agent.run_task("sh", "-c", "printf 'abc'; printf '\\377\\376'; printf 'tail'")
    ws = attach(agent, task["id"], 2)
    data = b""
    for message in ws.messages():
        if message["type"] == "output":
            data += decode(message)
        if message["type"] == "state":
            break
    assert data == b"abc\xff\xfetail"[2:]


def test_unknown_task_gets_an_error(agent) -> None:
    ws = attach(agent, "no-such-task")
    assert ws.receive_json()["type"] == "error"


@pytest.mark.parametrize("headers", [{}, {"X-Cluster-Secret": "wrong"},
                                     {"Authorization": "Bearer wrong"}])
def test_handshake_without_the_secret_is_refused_401(agent, headers) -> None:
    with pytest.raises(HandshakeError) as refused:
        WebSocket.connect(agent.url.replace("http", "ws") + "/ws", headers=headers)
    assert refused.value.status == 401


def test_browser_token_subprotocol_is_accepted(agent) -> None:
    token = base64.urlsafe_b64encode(SECRET.encode()).decode().rstrip("=")
    ws = WebSocket.connect(agent.url.replace("http", "ws") + "/ws",
                           protocols=["oxide.v1", f"oxide.token.{token}"])
    ws.send_json({"op": "subscribe", "topic": "cluster"})
    assert ws.receive_json() == {"type": "subscribed", "topic": "cluster"}
    agent.run_task("true")
    events = [ws.receive_json() for _ in range(2)]
    assert [e["event"] for e in events] == ["started", "finished"]


def test_garbage_frames_get_errors_then_a_policy_close(agent) -> None:
    ws = Node(agent.url, SECRET).websocket(timeout=20)
    for frame in (b"not json", b"[]", b'{"op":"launch"}', b'{"op":"attach","task":1}'):
        ws.send_text(frame)
        assert ws.receive_json()["type"] == "error"
    ws.send_frame(0x2, b"\x00\xff")
    assert ws.receive_json()["type"] == "error"
    task = agent.run_task("echo", "still fine")
    ws.send_json({"op": "attach", "task": task["id"]})
    kinds = [ws.receive_json()["type"] for _ in range(4)]
    assert kinds == ["attached", "output", "live", "state"]
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(10):
            ws.send_text(b"{")
            ws.receive_json()
    assert closed.value.code == 1008
    assert agent.get("/health").status == 200


def cli(agent, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OXIDE_")}
    env.update(OXIDE_NODE=agent.url, OXIDE_CLUSTER_SECRET=SECRET,
               PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-m", "oxide_cluster.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.mark.parametrize(("script", "code"), [
    ("echo out; echo err >&2", 0),
    ("echo out; echo err >&2; exit 3", 3),
    ("echo out; echo err >&2; kill -TERM $$", 128 + signal.SIGTERM),
])
def test_cli_exit_code_is_the_remote_exit_code(agent, script, code) -> None:
    process = cli(agent, "run", "--", "sh", "-c", script)
    out, err = process.communicate(timeout=30)
    assert process.returncode == code, err
    assert out == b"out\n"
    task_line, rest = err.split(b"\n", 1)
    assert task_line.startswith(b"oxide-cluster: task ")
    assert rest.startswith(b"err\n")


def test_cli_ctrl_c_cancels_the_remote_task(agent) -> None:
    process = cli(agent, "run", "--", "sh", "-c", "echo started; sleep 60")
    assert process.stdout is not None
    assert process.stdout.readline() == b"started\n"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 125, err
    tasks = agent.get("/tasks").json()["tasks"]
    assert tasks[0]["state"] == "cancelled"


def test_cli_logs_status_and_tasks(agent) -> None:
    task = agent.run_task("sh", "-c", "echo hello; echo oops >&2")
    logs = cli(agent, "logs", task["id"])
    assert logs.communicate(timeout=30) == (b"hello\n", b"oops\n")
    status = cli(agent, "status", task["id"])
    assert b'"state": "succeeded"' in status.communicate(timeout=30)[0]
    listing = cli(agent, "tasks", "--state", "succeeded")
    assert task["id"].encode() in listing.communicate(timeout=30)[0]

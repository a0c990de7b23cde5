"""Three real agents on loopback, chained 1 <- 2 <- 3: gossip gives each the whole cluster."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support import (
    REPO_ROOT,
    AgentProcess,
    free_port,
    http,
    poll_until,
    stop_all,
)


@pytest.fixture
def chain(tmp_path, request):
    nodes = [AgentProcess(tmp_path / f"n{i}", discovery=True) for i in range(1, 4)]
    n1, n2, n3 = nodes
    n2.extra_args = ("--peers", f"127.0.0.1:{n1.discovery_port}")
    n3.extra_args = ("--peers", f"127.0.0.1:{n2.discovery_port}")
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        report = getattr(request.node, "rep_call", None)
        stop_all(nodes, report is not None and report.failed)


def listed(node: AgentProcess) -> set[str]:
    view = node.get("/api/cluster/nodes").json()
    return {view["local_node"]["node_id"]} | {
        peer["node_id"] for peer in view["remote_nodes"] if peer["healthy"]}


def test_a_chain_of_static_peers_converges_and_any_node_answers(chain):
    ids = [node.get("/health").json()["node_id"] for node in chain]
    for node in chain:
        poll_until(lambda node=node: listed(node) == set(ids), timeout=10,
                   message=f"{node.name} to list all three nodes")
    n1, _, n3 = chain
    # n1 has no --peers and never names n3: it places there all the same.
    reply = n1.post("/execute?wait=10", {"command": "echo", "args": ["hi"], "node": ids[2]})
    assert reply.status == 200, reply
    task = reply.json()
    assert task["node_id"] == ids[2] and task["state"] == "succeeded"
    for node in chain:
        found = node.get(f"/task/{task['id']}")
        assert found.status == 200, (node.name, found)
        assert found.json()["node_id"] == ids[2]
        assert node.get(f"/task/{task['id']}/output").body == b"hi\n"
        page = node.get("/tasks?scope=cluster").json()
        assert task["id"] in {t["id"] for t in page["tasks"]}
        assert page["unreachable"] == []
    # A node that dies is named, not silently left out.
    n3.kill()
    poll_until(lambda: n1.get("/tasks?scope=cluster").json()["unreachable"] == [ids[2]],
               timeout=10, message="n1 to name the dead n3 as unreachable")


def read_until(stream, pattern: str, deadline: float) -> list[str]:
    lines = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no line matching {pattern!r} in: {''.join(lines)}")


def test_local_cluster_script_starts_nodes_that_converge_and_stops_them(tmp_path):
    base = 0
    for _ in range(20):  # three API/discovery pairs, ten ports apart, all free
        candidate = free_port() // 10 * 10
        if candidate + 21 < 65536 and all(
                port_free(candidate + offset, socket.SOCK_STREAM if offset % 10 == 0
                          else socket.SOCK_DGRAM) for offset in (0, 1, 10, 11, 20, 21)):
            base = candidate
            break
    assert base, "no free port range"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OXIDE_")}
    env.update(PYTHONPATH=str(REPO_ROOT), PATH=f"{os.path.dirname(sys.executable)}:"
               f"{env.get('PATH', '')}", LOCAL_CLUSTER_BASE_PORT=str(base))
    script = subprocess.Popen([str(REPO_ROOT / "scripts" / "local-cluster"), "3",
                               str(tmp_path / "cluster")], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        assert script.stdout is not None
        lines = read_until(script.stdout, r"Ctrl-C", time.monotonic() + 30)
        text = "".join(lines)
        secret = re.search(r"secret: (\S+)", text)
        assert secret, text
        urls = re.findall(r"^node\d\s+(http://\S+)", text, re.MULTILINE)
        assert urls == [f"http://127.0.0.1:{base + 10 * i}/" for i in range(3)], text
        for url in urls:
            poll_until(lambda url=url: http("GET", url + "api/cluster/nodes",
                                            secret=secret.group(1)).json()["healthy_nodes"]
                       == 3, timeout=20, message=f"{url} to see three nodes")
        script.send_signal(signal.SIGINT)
        assert script.wait(30) == 0
        for url in urls:
            port = int(url.rsplit(":", 1)[1].rstrip("/"))
            assert port_free(port), f"{url} still listening after Ctrl-C"
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait(10)
        print(script.stdout.read() if script.stdout else "")


def port_free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        if kind == socket.SOCK_STREAM:
            # Connections the node closed linger in TIME_WAIT; only a listener matters.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

"""Providers on real twistd nodes: an out-of-tree plugin transport pip-installed into a
venv, multicast on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO_ROOT, TWISTD, AgentProcess, free_port, poll_until, stop_all

DEMO = REPO_ROOT / "docs" / "examples" / "oxide-unixdgram"


def listed(node: AgentProcess) -> set[str]:
    view = node.get("/api/cluster/nodes").json()
    return {view["local_node"]["node_id"]} | {
        peer["node_id"] for peer in view["remote_nodes"] if peer["healthy"]}


@pytest.fixture
def nodes(request):
    started: list[AgentProcess] = []
    yield started
    report = getattr(request.node, "rep_call", None)
    stop_all(started, report is None or report.failed)


class VenvAgent(AgentProcess):
    """An agent run by another interpreter (a venv with the demo installed)."""

    def __init__(self, python: Path, home: Path, **options: Any) -> None:
        super().__init__(home, **options)
        self.python = python

    def argv(self) -> list[str]:
        return [str(self.python), *super().argv()[1:]]


@pytest.fixture(scope="module")
def demo_venv(tmp_path_factory) -> Path:
    """A throwaway venv that sees the test venv's packages and has the demo pip-installed
    into its own site-packages, as a third party's provider would be."""
    root = tmp_path_factory.mktemp("demo-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; "
                          "print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    # --system-site-packages means the base interpreter's, not this venv's: chain ours.
    Path(own, "test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    source = root / "oxide-unixdgram"  # a copy: the build leaves build/ behind
    shutil.copytree(DEMO, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "dropin.cache", "__pycache__"))
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--quiet", str(source)], capture_output=True, text=True, timeout=300, check=False)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


def test_the_installed_demo_provider_is_found_listed_and_joins_two_nodes(tmp_path, nodes,
                                                                          demo_venv):
    env = {"PYTHONPATH": str(REPO_ROOT)}  # the core from this tree; the demo from the venv
    where = subprocess.run([str(demo_venv), "-c", "import oxide_unixdgram; "
                            "print(oxide_unixdgram.__file__)"], capture_output=True,
                           text=True, env={**os.environ, **env}, check=True).stdout
    assert where.startswith(str(demo_venv.parent.parent))  # installed, not on a path
    probe = VenvAgent(demo_venv, tmp_path / "probe", env=env)
    help_text = subprocess.run([*probe.argv()[:3], "oxide-cluster", "--help"],
                               capture_output=True, text=True, env=probe.environment(),
                               timeout=60, check=False).stdout
    assert "discovery_transport: broadcast, codara, multicast, peers, unixdgram" in help_text

    sockets = tmp_path / "socks"
    args = ("--discovery-transport", "unixdgram", "--provider-options", f"unix_dir={sockets}")
    for name in ("a", "b"):
        node = VenvAgent(demo_venv, tmp_path / name, discovery=True, extra_args=args, env=env)
        nodes.append(node)
        node.start()
    ids = {node.get("/health").json()["node_id"] for node in nodes}
    for node in nodes:
        poll_until(lambda node=node: listed(node) == ids, timeout=15,
                   message=f"{node.name} to list both nodes through the Unix sockets")
    assert sorted(p.name for p in sockets.iterdir()) == sorted(
        f"{node.discovery_port}.sock" for node in nodes)


def test_help_lists_no_plugin_provider_where_none_is_installed():
    help_text = subprocess.run([*TWISTD, "oxide-cluster", "--help"], capture_output=True,
                               text=True, env=AgentProcess(REPO_ROOT).environment(),
                               timeout=60, check=False).stdout
    assert ("Installed providers: discovery_transport: broadcast, codara, multicast, peers; "
            "election: redis, standalone; runner: process.") in " ".join(help_text.split())


def test_an_unknown_transport_stops_start_up_in_one_line(tmp_path):
    node = AgentProcess(tmp_path / "x", discovery=True,
                        extra_args=("--discovery-transport", "pigeon"))
    result = subprocess.run(node.argv(), capture_output=True, text=True,
                            env=node.environment(), timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "oxide-cluster: cannot start: unknown discovery_transport 'pigeon' "
        "(installed: broadcast, codara, multicast, peers)")


def _loopback_multicast_works(group: str, port: int) -> bool:
    """Some sandboxes give loopback no multicast at all: skip rather than fail there."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        receiver.bind(("", port))
        receiver.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                            socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                          socket.inet_aton("127.0.0.1"))
        sender.sendto(b"probe", (group, port))
        receiver.settimeout(2.0)
        return receiver.recv(16) == b"probe"
    except OSError:
        return False
    finally:
        receiver.close()
        sender.close()


def test_two_nodes_find_each_other_by_multicast_on_loopback(tmp_path, nodes):
    group, port = "239.255.77.9", free_port(socket.SOCK_DGRAM)
    if not _loopback_multicast_works(group, port):
        pytest.skip("this host has no multicast on loopback")
    args = ("--discovery-transport", "multicast", "--multicast-group", f"{group}:{port}",
            "--multicast-interface", "127.0.0.1")
    for name in ("a", "b"):
        node = AgentProcess(tmp_path / name, discovery=True, extra_args=args)
        nodes.append(node)
        node.start()
    ids = {node.get("/health").json()["node_id"] for node in nodes}
    for node in nodes:
        poll_until(lambda node=node: listed(node) == ids, timeout=15,
                   message=f"{node.name} to list both nodes through the multicast group")


# The Codara cluster agent's README, "Discovery Protocol": each field and its JSON type.
CODARA_ANNOUNCE = {"type": str, "hostname": str, "platform": str, "arch": str, "cpus": int,
                   "totalMemory": int, "port": int, "timestamp": int}
CODARA_STATS = {"type": str, "hostname": str, "port": int, "stats": dict, "timestamp": int}
CODARA_STATS_STATS = {"cpu": (int, float), "memoryUsagePercent": (int, float),
                      "runningTasks": int, "availableSlots": int}


def _fields_typed(message: dict[str, Any], spec: dict[str, Any]) -> None:
    assert set(message) == set(spec), message
    for name, kind in spec.items():
        value = message[name]
        assert isinstance(value, kind) and not isinstance(value, bool), (name, value)


def test_a_codara_node_sends_codara_datagrams_and_keeps_oxide_membership_signed(tmp_path,
                                                                               nodes):
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the Codara main server
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.5)
    a, b = (AgentProcess(tmp_path / name, discovery=True) for name in ("a", "b"))
    a.extra_args = ("--discovery-transport", "codara", "--peers",
                    f"127.0.0.1:{b.discovery_port}", "--provider-options",
                    f"codara_server=127.0.0.1:{server.getsockname()[1]}")
    b.extra_args = ("--peers", f"127.0.0.1:{a.discovery_port}")  # a plain oxide node
    try:
        for node in (a, b):
            nodes.append(node)
            node.start()
        received: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 20
        while len(received) < 2 and time.monotonic() < deadline:
            try:
                data, sender = server.recvfrom(65536)
            except TimeoutError:
                continue
            assert sender[1] == a.discovery_port  # sent from the node's discovery port
            message = json.loads(data)  # only Codara's JSON comes here, never ours
            assert message["type"] in ("cluster_announce", "cluster_stats"), message
            received.setdefault(message["type"], message)
    finally:
        server.close()
    assert set(received) == {"cluster_announce", "cluster_stats"}, received
    announce, stats = received["cluster_announce"], received["cluster_stats"]
    _fields_typed(announce, CODARA_ANNOUNCE)
    _fields_typed(stats, CODARA_STATS)
    _fields_typed(stats["stats"], CODARA_STATS_STATS)
    assert announce["port"] == stats["port"] == a.port  # where its HTTP API answers
    assert abs(announce["timestamp"] / 1000 - time.time()) < 60
    # Membership between the two stays on oxide's signed protocol.
    ids = {node.get("/health").json()["node_id"] for node in nodes}
    for node in nodes:
        poll_until(lambda node=node: listed(node) == ids, timeout=15,
                   message=f"{node.name} to list both nodes")

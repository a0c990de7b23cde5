"""The harness itself, proven on placeholder processes (no oxide-cluster agent needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import harness
import psutil
import pytest
from harness import (
    Agent,
    NodeUnreachable,
    UdpSink,
    clear_faults,
    drop_udp,
    link_down,
    link_up,
    poll_until,
    send_udp,
)

# A tiny HTTP node: echoes the X-Cluster-Secret header as JSON, 404 elsewhere.
ECHO_SERVER = """
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/echo":
            self.send_error(404)
            return
        body = json.dumps({"secret": self.headers.get("X-Cluster-Secret")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)
HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


def http_server(host: harness.Host, port: int = 8000) -> Agent:
    """A stand-in "agent": python's http.server bound to the host's address."""
    argv = [sys.executable, "-m", "http.server", "--bind", host.ip, str(port)]
    return Agent(host, argv, api_port=port, timeout=1.0)


def received(sink: UdpSink, payload: bytes) -> list[str]:
    return [src for src, data in sink.datagrams() if data == payload]


def test_udp_broadcast_reaches_other_hosts(network):
    net = network(3)
    h1, h2, h3 = net.hosts
    sinks = [UdpSink(h, 4999) for h in (h2, h3)]
    send_udp(h1, net.broadcast, 4999, b"hello-all", broadcast=True)
    for sink in sinks:
        assert poll_until(lambda s=sink: received(s, b"hello-all"), 5,
                          message="broadcast not received") == [h1.ip]
    assert net.broadcast.endswith(".255") and h1.ip.endswith(".11")
    # Agents find their broadcast address from the interface, so it must be set there.
    probe = "import psutil; print([a.broadcast for a in psutil.net_if_addrs()['eth0']])"
    assert repr(net.broadcast) in h2.run([sys.executable, "-c", probe]).stdout


def test_add_host_joins_the_same_segment(network):
    net = network(1)
    late = net.add_host()
    assert late.ip.endswith(".12") and late.name == "h2"
    sink = UdpSink(late, 4999)
    send_udp(net.hosts[0], net.broadcast, 4999, b"late", broadcast=True)
    poll_until(lambda: received(sink, b"late"), 5, message="late host got no broadcast")


def test_http_client_and_process_control(network):
    net = network(1)
    node = http_server(net.hosts[0]).start()
    node.wait_http("/", timeout=10)
    proc = psutil.Process(node.pid)
    assert "http.server" in proc.cmdline(), "pid must be the server, not `ip netns exec`"

    status, body, headers = node.get("/")
    assert status == 200 and isinstance(body, bytes) and "content-type" in headers
    assert node.get("/missing")[0] == 404  # HTTP errors are returned, not raised

    node.pause()
    poll_until(lambda: proc.status() == psutil.STATUS_STOPPED, 5)
    with pytest.raises(NodeUnreachable):
        node.get("/", timeout=0.5)
    node.resume()
    assert node.get("/", timeout=5)[0] == 200

    assert node.stop() == -15 and not node.alive
    with pytest.raises(NodeUnreachable):
        node.get("/")

    node.restart()
    node.wait_http("/", timeout=10)
    assert node.kill() == -9 and not node.alive
    assert "start:" in node.log_text()


def test_http_client_sends_secret_and_parses_json(network):
    net = network(1)
    host = net.hosts[0]
    node = Agent(host, [sys.executable, "-c", ECHO_SERVER, host.ip, "8001"], api_port=8001,
                 secret="s3cret").start()
    poll_until(lambda: node.get("/echo")[0] == 200, 10)
    assert node.get("/echo")[1] == {"secret": "s3cret"}
    assert node.get("/echo", secret=None)[1] == {"secret": None}
    assert node.get("/echo", secret="other")[1] == {"secret": "other"}


def test_drop_udp_and_clear_faults(network):
    net = network(2)
    h1, h2 = net.hosts
    dropped, control = UdpSink(h2, 4001), UdpSink(h2, 4002)

    drop_udp(h2, 4001, 100)
    send_udp(h1, h2.ip, 4001, b"lost", count=5)
    send_udp(h1, h2.ip, 4002, b"marker")
    poll_until(lambda: received(control, b"marker"), 5, message="control port blocked")
    assert received(dropped, b"lost") == []

    clear_faults(h2)
    send_udp(h1, h2.ip, 4001, b"back")
    poll_until(lambda: received(dropped, b"back"), 5, message="clear_faults did not restore")


def test_drop_udp_percent_drops_some(network):
    net = network(2)
    h1, h2 = net.hosts
    sink, control = UdpSink(h2, 4001), UdpSink(h2, 4002)
    drop_udp(h2, 4001, 50)
    send_udp(h1, h2.ip, 4001, b"x", count=400)
    send_udp(h1, h2.ip, 4002, b"marker")
    poll_until(lambda: received(control, b"marker"), 5)
    got = len(received(sink, b"x"))
    assert 100 < got < 300, f"50% loss let {got}/400 through"


def test_link_down_partitions_a_host(network):
    net = network(3)
    h1, h2, h3 = net.hosts
    node = http_server(h2).start()
    node.wait_http("/", timeout=10)
    sink2, sink3 = UdpSink(h2, 4999), UdpSink(h3, 4999)

    link_down(h2)
    with pytest.raises(NodeUnreachable):
        node.get("/", timeout=0.5)
    send_udp(h1, net.broadcast, 4999, b"during", broadcast=True)
    poll_until(lambda: received(sink3, b"during"), 5, message="h1-h3 must still talk")
    assert received(sink2, b"during") == []

    link_up(h2)
    poll_until(lambda: node.get("/")[0] == 200, 10, message="h2 unreachable after link_up")
    send_udp(h1, net.broadcast, 4999, b"after", broadcast=True)
    poll_until(lambda: received(sink2, b"after"), 5, message="h2 cut off after link_up")


def test_redis_server_reachable_from_namespace_and_restartable(network, redis_server):
    net = network(1)
    host = net.hosts[0]
    redis = redis_server(net)
    assert redis.url == f"redis://{net.gateway}:{redis.port}"

    def cli(*args: str) -> str:
        res = host.run(["redis-cli", "-h", net.gateway, "-p", str(redis.port), *args])
        return res.stdout.strip()

    assert cli("ping") == "PONG"
    assert cli("set", "k", "v") == "OK"
    port = redis.port
    redis.restart()
    assert redis.port == port
    assert cli("ping") == "PONG"
    assert cli("get", "k") == "", "no persistence: a restart loses data"

    redis.kill()
    assert not redis.ping()
    assert cli("ping") != "PONG"


def _netns_names() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                              check=True).stdout.split())


def _link_names() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def test_teardown_leaves_nothing_even_after_failure(tmp_path):
    try:
        with harness.Network("ox", 2, tmp_path) as net:
            node = http_server(net.hosts[0]).start()
            sink = UdpSink(net.hosts[1], 4999)
            redis = harness.RedisServer(net).start()
            pids = [node.pid, sink.proc.pid, redis.proc.pid]
            netns = [h.netns for h in net.hosts]
            links = [net.bridge] + [h.veth for h in net.hosts]
            assert set(netns) <= _netns_names() and set(links) <= _link_names()
            raise RuntimeError("scenario failed")
    except harness.HarnessUnavailable as exc:
        pytest.skip(str(exc))
    except RuntimeError:
        pass
    assert not set(netns) & _netns_names()
    assert not set(links) & _link_names()
    assert not [p for p in pids if psutil.pid_exists(p)]
    assert not net.registry.path.exists()


def test_cleanup_stale_removes_dead_runs_only(tmp_path, network):
    network(1)  # skips when namespaces are unavailable
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_ns = f"oxh{dead.pid}-1-1"
    subprocess.run(["ip", "netns", "add", stale_ns], check=True)
    orphan = subprocess.Popen(["ip", "netns", "exec", stale_ns, "sleep", "300"])
    record = {"owner": [dead.pid], "netns": [stale_ns], "links": [],
              "procs": [[orphan.pid, psutil.Process(orphan.pid).create_time()]]}
    harness.REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
    stale_file = harness.REGISTRY_DIR / f"ox-{dead.pid}-stale.json"
    stale_file.write_text(json.dumps(record))
    live_files = {p for p in harness.REGISTRY_DIR.glob("*.json") if p != stale_file}

    cleaned = harness.cleanup_stale()
    assert str(stale_file) in cleaned
    assert orphan.wait(5) == -9
    assert stale_ns not in _netns_names()
    assert live_files <= set(harness.REGISTRY_DIR.glob("*.json")), "live run was cleaned"


def test_poll_until_reports_last_value():
    with pytest.raises(AssertionError, match=r"never .*last seen: \[\]"):
        poll_until(lambda: [], 0.2, message="never")
    with pytest.raises(AssertionError, match=r"last seen: ZeroDivisionError"):
        poll_until(lambda: 1 / 0, 0.2)
    assert poll_until(lambda: "yes", 1) == "yes"


def test_logs_dumped_when_a_cluster_test_fails(pytester):
    here = Path(__file__).parent
    for name in ("harness.py", "conftest.py"):
        pytester.makefile(Path(name).suffix, **{Path(name).stem: (here / name).read_text()})
    pytester.makeini("[pytest]\nmarkers =\n    cluster: x\n")
    pytester.makepyfile(test_inner="""
        import sys
        def test_fails(network):
            net = network(1)
            proc = net.hosts[0].spawn([sys.executable, "-c", "print('NODE-LOG-LINE')"])
            proc.wait(10)
            assert False, "scenario failed"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert "NODE-LOG-LINE" in result.stderr.str() + result.stdout.str()
    assert os.geteuid() == 0

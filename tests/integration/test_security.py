"""What SECURITY.rst promises, checked on real agents: the secret guards every route and
the WebSocket, never leaks, tasks inherit no agent socket, and TLS works as documented."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import re
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from oxide_cluster.api import TaskApi
from oxide_cluster.client import HandshakeError, Node, WebSocket
from tests.support import SECRET, AgentProcess, poll_until

# Served without the secret on purpose (SECURITY.rst says why): liveness, the API
# description and the dashboard's static files. Everything else must refuse.
PUBLIC = {"/health", "/openapi.json", "/", "/ui", "/ui/", "/ui/<path:__rest__>"}
WRONG = "not-the-secret-7c1e"


def protected_routes() -> list[tuple[str, str]]:
    """(method, concrete path) for every rule of the Klein app that is not public."""
    routes = []
    for rule in TaskApi.app.url_map.iter_rules():
        if rule.rule in PUBLIC:
            continue
        # A digest route takes exactly 64 characters; other parameters any text.
        path = re.sub(r"<string\(length=64\):[a-z_]+>", "0" * 64, rule.rule)
        path = re.sub(r"<(?:[a-z]+:)?[a-z_]+>", "x-node", path)
        methods = sorted((rule.methods or {"GET"}) - {"HEAD", "OPTIONS"})
        routes += [(method, path) for method in methods]
    return routes


def test_the_route_list_is_derived_and_not_empty() -> None:
    assert ("POST", "/execute") in protected_routes()
    assert ("GET", "/ws") in protected_routes()
    assert len(protected_routes()) >= 12


@pytest.mark.parametrize(("method", "path"), protected_routes())
def test_every_route_refuses_a_missing_or_wrong_secret(agent, method, path) -> None:
    attempts = [
        {},
        {"X-Cluster-Secret": WRONG},
        {"Authorization": f"Bearer {WRONG}"},
        {"Authorization": f"Basic {base64.b64encode(SECRET.encode()).decode()}"},
        {"X-Cluster-Secret": SECRET[:-1]},
        {"X-Cluster-Secret": SECRET + "x"},  # (trailing spaces are not part of a header)
        {"X-Cluster-Secret": SECRET.upper()},
    ]
    for headers in attempts:
        reply = agent.request(method, path, secret=None, headers=headers, raw=b"{}" if
                              method == "POST" else None)
        assert reply.status == 401, (method, path, headers, reply)
        assert reply.json()["error"]["code"] == "unauthorized"
        assert reply.headers.get("WWW-Authenticate") == "Bearer"


@pytest.mark.parametrize("path", sorted(PUBLIC - {"/ui/<path:__rest__>"}) + ["/ui/app.js"])
def test_public_routes_hold_no_data(agent, path) -> None:
    reply = agent.get(path, secret=None)
    assert reply.status in (200, 302)
    assert SECRET.encode() not in reply.body


@pytest.mark.parametrize("protocols", [
    ["oxide.v1"],
    ["oxide.v1", "oxide.token." + base64.urlsafe_b64encode(WRONG.encode()).decode()],
    ["oxide.v1", "oxide.token.!!not-base64!!"],
    ["oxide.v1", "oxide.token." + base64.urlsafe_b64encode(SECRET[:-1].encode()).decode()],
])
def test_websocket_refuses_a_wrong_token_subprotocol(agent, protocols) -> None:
    with pytest.raises(HandshakeError) as refused:
        WebSocket.connect(agent.url.replace("http", "ws") + "/ws", protocols=protocols)
    assert refused.value.status == 401


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_secret_never_appears_in_responses_streams_or_logs(agent_factory,
                                                               log_format) -> None:
    agent = agent_factory(extra_args=("--log-format", log_format))
    token = "secret-env-value-41d2"
    task = agent.run_task("sh", "-c", 'echo "len ${#TOKEN}"', secret_env={"TOKEN": token},
                          env={"PLAIN": "visible"})
    assert task["state"] == "succeeded"
    ws = Node(agent.url, SECRET).websocket(timeout=20)
    ws.send_json({"op": "attach", "task": task["id"]})
    frames = []
    for message in ws.messages():
        frames.append(str(message))
        if message["type"] == "state":
            break
    ws.close()
    agent.get("/stats", secret=WRONG)  # a refused attempt must not log what it sent
    bodies = [agent.request(method, path.replace("x-node", task["id"])).body
              for method, path in protected_routes() if (method, path) != ("GET", "/ws")
              and method == "GET"]
    bodies += [agent.get(path, secret=None).body for path in ("/health", "/openapi.json")]
    seen = b"".join(bodies).decode(errors="replace") + "".join(frames)
    assert "len 21" in seen  # the task did get its secret_env
    for value in (SECRET, token, WRONG):
        assert value not in seen
        assert value not in agent.log_text()


def test_agent_sockets_are_not_open_in_a_task(agent_factory, tmp_path) -> None:
    """Neither the HTTP listener nor the UDP discovery socket leaks into a task."""
    node = agent_factory(discovery=True)
    go = tmp_path / "go"
    reply = node.post("/execute", {"command": "sh", "args": [
        "-c", 'ls -l /proc/self/fd; while [ ! -e "$1" ]; do sleep 0.05; done', "sh", str(go)]})
    assert reply.status == 202, reply
    task_id = reply.json()["id"]
    poll_until(lambda: node.get(f"/task/{task_id}").json()["output_bytes"] > 0,
               message="the task's fd listing")
    agent_fds = {os.readlink(f"/proc/{node.pid}/fd/{fd}")
                 for fd in os.listdir(f"/proc/{node.pid}/fd")}
    assert any(link.startswith("socket:") for link in agent_fds)  # the check can see them
    task_pids = [int(pid) for pid in Path(f"/proc/{node.pid}/task/{node.pid}/children")
                 .read_text().split()]
    assert task_pids, "the task is a child of the agent"
    for pid in task_pids:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        # 0-2 are the agent's pipes; no socket of the agent (TCP or UDP) is inherited.
        assert not [link for link in links if link.startswith("socket:")], (pid, links)
    go.touch()
    final = node.get(f"/task/{task_id}?wait=20").json()
    assert final["state"] == "succeeded"
    assert "socket:" not in node.get(f"/task/{task_id}/output").body.decode()


# -- TLS ----------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1 and localhost, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "oxide-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class TlsAgent(AgentProcess):
    """An agent started exactly as SECURITY.rst says: ``--listen ssl:PORT:privateKey=...``."""

    def __init__(self, home: Path, key: Path, cert: Path) -> None:
        super().__init__(home)
        self.key, self.cert = key, cert
        self.context = ssl.create_default_context(cafile=str(cert))

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        args = super().argv()
        listen = args.index("--listen") + 1
        args[listen] = (f"ssl:{self.port}:privateKey={self.key}:certKey={self.cert}"
                        ":interface=127.0.0.1")
        return args

    def https(self, path: str, secret: str | None = SECRET) -> tuple[int, bytes]:
        headers = {"X-Cluster-Secret": secret} if secret else {}
        request = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.context) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log_text()
            return self.https("/ready")[0] == 200
        poll_until(ready, timeout, message="the TLS agent to be ready")


@pytest.fixture
def tls_agent(tmp_path):
    key, cert = self_signed(tmp_path)
    node = TlsAgent(tmp_path / "tls-node", key, cert)
    node.start()
    yield node
    node.terminate()


def test_api_over_tls_with_a_verified_self_signed_certificate(tls_agent) -> None:
    status, body = tls_agent.https("/health", secret=None)
    assert status == 200 and b'"status":"ok"' in body
    assert tls_agent.https("/api/cluster/leader")[0] == 200
    assert tls_agent.https("/stats", secret=WRONG)[0] == 401
    assert tls_agent.https("/stats", secret=None)[0] == 401


def test_tls_listener_verifies_and_speaks_no_plain_http(tls_agent) -> None:
    with pytest.raises(urllib.error.URLError) as unverified:
        urllib.request.urlopen(tls_agent.url + "/health", timeout=10,
                               context=ssl.create_default_context())
    assert "CERTIFICATE_VERIFY_FAILED" in str(unverified.value)
    with socket.create_connection(("127.0.0.1", tls_agent.port), timeout=10) as plain:
        plain.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        answer = plain.recv(4096)
    assert not answer.startswith(b"HTTP/")



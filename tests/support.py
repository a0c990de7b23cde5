"""Helpers for tests that run real agents: start, stop, HTTP, and polling with a deadline."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c",
          "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
SECRET = "test-secret-3f9a2c"

T = TypeVar("T")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def poll_until(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Call ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = condition()
        except Exception as error:  # a node still starting refuses connections
            last = error
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}; "
                                 f"last: {last!r}")
        time.sleep(interval)


class Response:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


def http(method: str, url: str, body: Any = None, secret: str | None = SECRET,
         headers: dict[str, str] | None = None, raw: bytes | None = None,
         timeout: float = 10.0) -> Response:
    """One HTTP call; error statuses are returned, not raised."""
    all_headers = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        all_headers.setdefault("Content-Type", "application/json")
    if secret is not None:
        all_headers.setdefault("X-Cluster-Secret", secret)
    request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return Response(reply.status, reply.read(), dict(reply.headers))
    except urllib.error.HTTPError as error:
        return Response(error.code, error.read(), dict(error.headers))


class AgentProcess:
    """A real ``twistd -n oxide-cluster`` process on loopback with its own state dir."""

    def __init__(self, home: Path, secret: str | None = SECRET, port: int | None = None,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 discovery: bool = False) -> None:
        self.home = home
        self.state_dir = home / "state"
        self.secret = secret
        self.port = port or free_port()
        self.discovery_port = free_port(socket.SOCK_DGRAM)
        self.extra_args = extra_args
        self.extra_env = env or {}
        self.discovery = discovery
        self.name = home.name
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = home / "agent.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        args = [*TWISTD, "-n", "--pidfile=", "oxide-cluster",
                "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--state-dir", str(self.state_dir),
                "--discovery-port", str(self.discovery_port)]
        if not self.discovery:
            args.append("--no-discovery")
        return [*args, *self.extra_args]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OXIDE_")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        if self.secret is not None:
            env["OXIDE_CLUSTER_SECRET"] = self.secret
        env.update(self.extra_env)
        return env

    def start(self, wait: bool = True) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv(), cwd=self.home, env=self.environment(),
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"agent exited with {self.process.returncode}:\n"
                                     + self.log_text())
            return self.get("/ready").status == 200
        try:
            poll_until(ready, timeout, message=f"{self.name} to be ready")
        except AssertionError as error:
            if "agent exited" in str(error):
                raise AssertionError(str(error).split("last: ")[-1]) from None
            raise

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait for a clean exit; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def terminate(self) -> None:
        """Cleanup: stop whatever is still running, never raise."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.stop(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Response:
        kwargs.setdefault("secret", self.secret)
        return http(method, self.url + path, body, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Response:
        return self.request("POST", path, body, **kwargs)

    def run_task(self, command: str, *args: str, wait: float = 30, **fields: Any) -> dict:
        """Submit a task and wait for its end; returns the task JSON."""
        reply = self.post(f"/execute?wait={wait}",
                          {"command": command, "args": list(args), **fields})
        assert reply.status in (200, 202), reply
        task = reply.json()
        if task["state"] in ("queued", "running"):
            task = self.get(f"/task/{task['id']}?wait={wait}").json()
        return task


def loopback_cluster(home: Path, count: int, extra_args: tuple[str, ...] = ()
                     ) -> list[AgentProcess]:
    """``count`` agents on loopback that find each other through static ``--peers``."""
    nodes = [AgentProcess(home / f"n{i}", discovery=True) for i in range(count)]
    for node in nodes:
        others = [f"127.0.0.1:{peer.discovery_port}" for peer in nodes if peer is not node]
        node.extra_args = ("--peers", ",".join(others), *extra_args)
    return nodes


def start_meshed(nodes: list[AgentProcess]) -> None:
    """Start every node and wait until each sees all of them healthy."""
    for node in nodes:
        node.start()
    for node in nodes:
        poll_until(lambda node=node: node.get("/api/cluster/nodes").json()["healthy_nodes"]
                   == len(nodes), message=f"{node.name} to see all {len(nodes)} nodes")


def stop_all(nodes: list[AgentProcess], failed: bool) -> None:
    """Stop every node; print each one's log when the test failed."""
    for node in nodes:
        node.terminate()
        if failed:
            print(f"\n===== log of {node.name} =====\n{node.log_text()}")

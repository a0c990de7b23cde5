"""Shared pieces of the benchmarks: a local agent, a keep-alive client, result files."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TWISTD = [sys.executable, "-c",
          "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
SECRET = "bench-secret"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalAgent:
    """One ``twistd -n oxide-cluster`` on loopback for the length of a benchmark."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.home = Path(tempfile.mkdtemp(prefix="oxide-bench-"))
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalAgent:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OXIDE_")}
        env.update(PYTHONPATH=str(REPO), OXIDE_CLUSTER_SECRET=SECRET)
        argv = [*TWISTD, "-n", "--pidfile=", "--logfile", str(self.home / "agent.log"),
                "oxide-cluster", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--state-dir", str(self.home / "state"), "--no-discovery", *self.args]
        self.process = subprocess.Popen(argv, cwd=self.home, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if Client(self.port).call("GET", "/ready")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("agent did not become ready; see " + str(self.home))

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        """Stop the agent; its home (state dir, log) goes too unless the run failed,
        where it is kept to be read (a run of every section left gigabytes in /tmp)."""
        assert self.process is not None
        self.process.terminate()
        self.process.wait(30)
        if kind is None:
            shutil.rmtree(self.home, ignore_errors=True)
        else:
            print(f"agent home kept for reading: {self.home}", file=sys.stderr)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


class Client:
    """A keep-alive HTTP client pinned to one local node."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"X-Cluster-Secret": SECRET}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.connection.request(method, path, body=data, headers=headers)
        reply = self.connection.getresponse()
        raw = reply.read()
        try:
            return reply.status, json.loads(raw)
        except ValueError:
            return reply.status, raw


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def save(name: str, data: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def raw_spawn_rate(count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        subprocess.run(["/bin/true"], check=True)
    return count / (time.perf_counter() - started)


def run_true(client: Client, pause: float = 0.005) -> tuple[dict[str, Any], int]:
    """Run /bin/true to its end through ``POST /execute?wait`` on ``client``: (final task,
    refusals retried). A task the cluster queued (202 ``queued``: a Redis cluster answers
    at once) is followed with ``GET /task/{id}?wait`` until it ends."""
    refused = 0
    while True:
        status, body = client.call("POST", "/execute?wait=30", {"command": "/bin/true"})
        if status in (429, 503):
            refused += 1
            time.sleep(pause)
            continue
        break
    while status in (200, 202) and body["state"] in ("queued", "running"):
        if body["state"] == "queued":
            time.sleep(pause)  # ?wait does not wait on a task queued in Redis yet
        status, body = client.call("GET", f"/task/{body['id']}?wait=30")
    assert status == 200 and body["state"] == "succeeded", (status, body)
    return body, refused


def http_rate(port: int, count: int, clients: int) -> tuple[float, int, dict[str, int]]:
    """(tasks/s, refusals retried, tasks per node id) for ``count`` tasks of /bin/true."""
    remaining = [count]
    refused = [0]
    where: dict[str, int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            client = Client(port)
            while True:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                body, retried = run_true(client)
                with lock:
                    refused[0] += retried
                    where[body["node_id"]] = where.get(body["node_id"], 0) + 1
        except BaseException as error:  # surfaced after join
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return count / (time.perf_counter() - started), refused[0], where

"""Real oxide-cluster agents on harness hosts: start N, wait for /ready, read their tables.

Used by the scenarios (through the ``cluster`` fixture) and by ``bench/discovery.py``;
plain synchronous code like the harness itself.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from harness import Agent, Host, Network, NodeUnreachable, poll_until

from tests.support import REPO_ROOT, SECRET, TWISTD

API_PORT = 4000
DISCOVERY_PORT = 4001


class OxideNode:
    """One ``twistd -n oxide-cluster`` on a host, with its own state dir that survives restarts."""

    def __init__(self, host: Host, state_dir: Path, extra_args: Sequence[str] = (),
                 secret: str = SECRET) -> None:
        self.host = host
        self.state_dir = state_dir
        self.secret = secret
        argv = [*TWISTD, "-n", "--pidfile=", "oxide-cluster",
                "--listen", f"tcp:{API_PORT}:interface={host.ip}",
                "--state-dir", str(state_dir), *extra_args]
        env = {"PYTHONPATH": str(REPO_ROOT), "OXIDE_CLUSTER_SECRET": secret}
        self.agent = Agent(host, argv, env=env, state_dir=state_dir, api_port=API_PORT,
                           secret=secret)
        self.started_at = 0.0  # time.monotonic() of the last start()
        self._node_id: str | None = None

    def __repr__(self) -> str:
        return f"<OxideNode {self.host.name} {self.host.ip}>"

    @property
    def name(self) -> str:
        return self.host.name

    # -- lifecycle

    def start(self) -> OxideNode:
        self.started_at = time.monotonic()
        self.agent.start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Poll ``/ready`` until 200; return the monotonic time it was first seen."""
        def ready() -> float | None:
            if not self.agent.alive:
                raise AssertionError(f"{self} exited:\n{self.agent.log_text()[-3000:]}")
            try:
                status = self.agent.get("/ready")[0]
            except NodeUnreachable:
                return None
            return time.monotonic() if status == 200 else None
        return float(poll_until(ready, timeout, interval=0.02,
                                message=f"{self} not ready"))

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; assert a clean shutdown.

        twistd re-raises the signal after its reactor stopped cleanly, so the exit
        status is -SIGTERM; the log tells a clean stop from a crash.
        """
        code = self.agent.stop(timeout)
        self.assert_stopped_cleanly(code)
        return code

    def assert_stopped_cleanly(self, code: int) -> None:
        log = self.agent.log_text()
        assert code in (0, -signal.SIGTERM), f"{self} exited {code}:\n{log[-3000:]}"
        assert "discovery closed port" in log and "Main loop terminated" in log, log[-3000:]

    def kill(self) -> int:
        return self.agent.kill()

    @property
    def alive(self) -> bool:
        return self.agent.alive

    # -- reading

    def get_json(self, path: str) -> Any:
        status, body, _ = self.agent.get(path)
        if status != 200:
            raise AssertionError(f"GET {path} on {self}: {status} {body!r}")
        return body

    def nodes(self) -> dict[str, Any]:
        """``/api/cluster/nodes`` as parsed JSON."""
        body: dict[str, Any] = self.get_json("/api/cluster/nodes")
        return body

    def remote(self) -> dict[str, dict[str, Any]]:
        """This node's peer table: node_id -> node JSON."""
        return {n["node_id"]: n for n in self.nodes()["remote_nodes"]}

    def discovery_stats(self) -> dict[str, Any]:
        body: dict[str, Any] = self.get_json("/stats")["discovery"]
        return body

    @property
    def node_id(self) -> str:
        """Stable across restarts (persisted in the state dir), so cached after one read."""
        if self._node_id is None:
            self._node_id = str(self.nodes()["local_node"]["node_id"])
        return self._node_id


def healthy_in(observer: OxideNode, targets: Iterable[OxideNode]) -> bool:
    """True if ``observer`` lists every target as alive and healthy."""
    table = observer.remote()
    return all(t.node_id in table and table[t.node_id]["state"] == "alive"
               and table[t.node_id]["healthy"] for t in targets)


def all_see(observers: Iterable[OxideNode], target: OxideNode,
            accept: Callable[[dict[str, Any] | None], bool]) -> bool:
    """True if ``accept(entry)`` holds for ``target``'s entry (None: absent) on every observer."""
    return all(accept(o.remote().get(target.node_id)) for o in observers)


def fully_meshed(nodes: Sequence[OxideNode]) -> bool:
    return all(healthy_in(o, [t for t in nodes if t is not o]) for o in nodes)


class Cluster:
    """Agents on the hosts of one harness network, one per host."""

    def __init__(self, net: Network, base_dir: Path, extra_args: Sequence[str] = ()) -> None:
        self.net = net
        self.base_dir = base_dir
        self.extra_args = list(extra_args)
        self.nodes: list[OxideNode] = []

    def node_for(self, host: Host) -> OxideNode:
        node = OxideNode(host, self.base_dir / host.name / "state", self.extra_args)
        self.nodes.append(node)
        return node

    def start(self, hosts: Sequence[Host], timeout: float = 60.0) -> list[OxideNode]:
        """Start an agent on each host at once, then wait until every one is ready."""
        started = [self.node_for(h).start() for h in hosts]
        for node in started:
            node.wait_ready(timeout)
        return started

    def add(self, timeout: float = 30.0) -> OxideNode:
        """A new host on the segment and a ready agent on it."""
        (node,) = self.start([self.net.add_host()], timeout)
        return node

    def live(self) -> list[OxideNode]:
        return [n for n in self.nodes if n.alive]

    def wait_meshed(self, timeout: float = 15.0) -> None:
        """Every live node lists every other one as alive and healthy."""
        poll_until(lambda: fully_meshed(self.live()), timeout, interval=0.1,
                   message="cluster not fully meshed")

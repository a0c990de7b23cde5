"""Multi-host test harness: Linux network namespaces joined by one bridge.

Plain synchronous code (subprocess + http.client) so scenarios stay readable and the
harness never competes with the agent for a reactor. Layout of one ``Network``::

    root namespace: bridge <prefix>br..  10.250.X.1/24   (test process, redis-server)
    namespace h1:   eth0                 10.250.X.11/24  (one agent)
    namespace h2:   eth0                 10.250.X.12/24  ...

Every resource is recorded in a registry file under ``REGISTRY_DIR`` *before* it is
created, so ``cleanup_stale()`` can remove what a crashed run (dead owner pid) left.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

REGISTRY_DIR = Path("/run/oxide-harness")
DISCOVERY_PORT = 4001
FAULT_TABLE = "oxt"
_SUBNET_BASE = "10.250"
_counter = 0


class HarnessUnavailable(Exception):
    """Namespaces cannot be created here (not root, no ``ip netns``); tests should skip."""


class HarnessError(Exception):
    """A harness operation failed (command error, leftover resources)."""


class NodeUnreachable(Exception):
    """An HTTP request to a node failed below HTTP (refused, reset, timed out)."""


class StopTimeout(AssertionError):
    """A process ignored SIGTERM past its deadline (it has been SIGKILLed since)."""


# --------------------------------------------------------------------------- helpers


def sh(argv: Sequence[str], check: bool = True, timeout: float = 20) -> str:
    """Run a command in the root namespace; raise HarnessError with its output on failure."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise HarnessError(
            f"{' '.join(argv)!r} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}"
        )
    return proc.stdout


def poll_until(
    condition: Callable[[], Any],
    timeout: float,
    interval: float = 0.05,
    message: str = "condition not met",
) -> Any:
    """Call ``condition()`` until it is truthy and return that value.

    The only way scenarios wait: every distributed assertion needs a deadline. Exceptions
    from ``condition`` count as "not yet"; the last value or exception is in the error.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = condition()
        except Exception as exc:  # keep polling; report the last failure
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (after {timeout}s; last seen: {last!r})")
        time.sleep(interval)


def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``ip`` (the kernel picks it)."""
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --------------------------------------------------------------------------- registry


class _Registry:
    """Records the resources of one Network in a JSON file so a later run can clean up."""

    def __init__(self, key: str):
        self.path = REGISTRY_DIR / f"{key}.json"
        self.data: dict[str, list[Any]] = {"netns": [], "links": [], "procs": []}
        self.data["owner"] = [os.getpid()]

    def add(self, kind: str, item: Any) -> None:
        self.data[kind].append(item)
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)

    def remove_file(self) -> None:
        self.path.unlink(missing_ok=True)


def _kill_recorded(procs: list[list[Any]]) -> None:
    """SIGKILL recorded (pid, create_time) pairs that still are the same process."""
    for pid, created in procs:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 0.01:
                p.kill()
        except psutil.Error:
            pass


def _kill_netns_pids(netns: str) -> None:
    for line in sh(["ip", "netns", "pids", netns], check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(line), signal.SIGKILL)


def _remove_resources(netns: list[str], links: list[str], procs: list[list[Any]]) -> None:
    _kill_recorded(procs)
    for ns in netns:
        _kill_netns_pids(ns)
    for ns in netns:
        # Processes must be gone, or the namespace outlives its name.
        with contextlib.suppress(AssertionError):
            poll_until(lambda ns=ns: not sh(["ip", "netns", "pids", ns], check=False).strip(),
                       5, message=f"processes left in {ns}")
        sh(["ip", "netns", "del", ns], check=False)
    for link in links:
        sh(["ip", "link", "del", link], check=False)


def cleanup_stale() -> list[str]:
    """Remove namespaces, links and processes of earlier runs whose owner pid is dead.

    Safe while other harness runs are live: only dead owners' resources are touched.
    Returns the registry files that were cleaned.
    """
    cleaned = []
    if REGISTRY_DIR.is_dir():
        for path in REGISTRY_DIR.glob("*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = None
            if data and _pid_alive(data["owner"][0]):
                continue
            if data:
                _remove_resources(data["netns"], data["links"], data["procs"])
            path.unlink(missing_ok=True)
            cleaned.append(str(path))
    return cleaned


# --------------------------------------------------------------------------- processes


class Proc:
    """A process started by the harness: a Popen whose pid *is* the program.

    ``ip netns exec`` execs the command (no fork), so signalling ``pid`` reaches the
    program itself; ``start_new_session`` puts it in its own process group as well.
    """

    def __init__(self, argv: Sequence[str], popen: subprocess.Popen, log_path: Path):
        self.argv = list(argv)
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        try:
            self.create_time = psutil.Process(self.pid).create_time()
        except psutil.Error:
            self.create_time = 0.0

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; on timeout SIGKILL and raise StopTimeout."""
        self.signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise StopTimeout(f"{self.argv[:3]}... pid {self.pid} ignored SIGTERM for "
                              f"{timeout}s; killed") from None

    def kill_tree(self) -> int:
        """SIGKILL the process and every descendant (a dead host loses its tasks too)."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            children = []
        self.signal(signal.SIGKILL)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        return self.popen.wait(10)


def _spawn(
    argv: Sequence[str],
    prefix: Sequence[str],
    env: Mapping[str, str] | None,
    log_path: Path,
    registry: _Registry,
    procs: list[Proc],
) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "ab") as log:
        log.write(f"=== {time.strftime('%H:%M:%S')} start: {list(argv)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            [*prefix, *argv], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
        )
    proc = Proc(argv, popen, log_path)
    registry.add("procs", [proc.pid, proc.create_time])
    procs.append(proc)
    return proc


# --------------------------------------------------------------------------- network


class Host:
    """One simulated machine: a network namespace with ``eth0`` on the bridge."""

    def __init__(self, network: Network, index: int, netns: str, ip: str, veth: str):
        self.network = network
        self.index = index
        self.name = f"h{index}"
        self.netns = netns
        self.ip = ip
        self.veth = veth  # root-namespace end of the cable, used for link_down

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ip} netns={self.netns}>"

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]

    def run(self, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """subprocess.run inside the namespace (text mode, output captured by default)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 20)
        return subprocess.run([*self.exec_prefix(), *cmd], check=False, **kw)

    def spawn(self, cmd: Sequence[str], env: Mapping[str, str] | None = None,
              log_path: Path | str | None = None) -> Proc:
        """Start a long-running process in the namespace, output to ``log_path``."""
        path = Path(log_path) if log_path else self.network.log_dir / f"{self.name}-proc.log"
        return _spawn(cmd, self.exec_prefix(), env, path, self.network.registry,
                      self.network.procs)


class Network:
    """N namespaces on one bridge with a free /24; a context manager that always cleans up."""

    def __init__(self, name_prefix: str = "ox", n_hosts: int = 3,
                 log_dir: Path | str | None = None):
        global _counter
        if not re.fullmatch(r"[a-z]{1,4}", name_prefix):
            raise ValueError("name_prefix must be 1-4 lowercase letters (link names <= 15)")
        _counter += 1
        pid = os.getpid()
        short = _b36(pid) + _b36(_counter)  # <= 7 chars, keeps link names <= 15
        self.prefix = name_prefix
        self.n_initial = n_hosts
        self.bridge = f"{name_prefix}br{short}"
        self._short = short
        self._ns_base = f"{name_prefix}h{pid}-{_counter}"
        self.log_dir = Path(log_dir) if log_dir else Path(f"/tmp/{self._ns_base}-logs")
        self.registry = _Registry(f"{name_prefix}-{pid}-{_counter}")
        self.hosts: list[Host] = []
        self.procs: list[Proc] = []
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway = ""

    # -- lifecycle

    def __enter__(self) -> Network:
        _check_available()
        try:
            self._create_bridge()
            for _ in range(self.n_initial):
                self.add_host()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process, delete namespaces and links; raise if anything is left."""
        netns = [h.netns for h in self.hosts]
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.kill_tree()
        _remove_resources(netns, self.registry.data["links"], self.registry.data["procs"])
        left = leftovers(self)
        if left:
            raise HarnessError(f"teardown left resources behind: {left}")
        self.registry.remove_file()

    # -- construction

    def _create_bridge(self) -> None:
        self.registry.add("links", self.bridge)
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        # Serialise subnet choice with concurrent harness runs on this machine.
        with open(REGISTRY_DIR / "subnet.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = _pick_subnet()
            self.gateway = str(self.subnet.network_address + 1)
            sh(["ip", "link", "add", self.bridge, "type", "bridge"])
            sh(["ip", "addr", "add", f"{self.gateway}/24", "brd", "+", "dev", self.bridge])
        sh(["ip", "link", "set", self.bridge, "up"])

    def add_host(self) -> Host:
        """Create one more namespace on the bridge (e.g. a node that joins late)."""
        assert self.subnet is not None, "use Network as a context manager"
        index = len(self.hosts) + 1
        netns = f"{self._ns_base}-{index}"
        veth = f"{self.prefix}v{self._short}h{index}"
        peer = f"{self.prefix}p{self._short}h{index}"
        ip = str(self.subnet.network_address + 10 + index)
        self.registry.add("netns", netns)
        self.registry.add("links", veth)
        sh(["ip", "netns", "add", netns])
        host = Host(self, index, netns, ip, veth)
        self.hosts.append(host)
        sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer])
        sh(["ip", "link", "set", peer, "netns", netns])
        sh(["ip", "link", "set", veth, "master", self.bridge])
        sh(["ip", "link", "set", veth, "up"])
        ns = host.exec_prefix()
        sh([*ns, "ip", "link", "set", peer, "name", "eth0"])
        sh([*ns, "ip", "addr", "add", f"{ip}/24", "brd", "+", "dev", "eth0"])
        sh([*ns, "ip", "link", "set", "eth0", "up"])
        sh([*ns, "ip", "link", "set", "lo", "up"])
        return host

    @property
    def broadcast(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.broadcast_address)

    def spawn_root(self, cmd: Sequence[str], log_path: Path,
                   env: Mapping[str, str] | None = None) -> Proc:
        """Start a process in the root namespace, owned (and torn down) by this network."""
        return _spawn(cmd, [], env, log_path, self.registry, self.procs)

    def log_files(self) -> list[Path]:
        return sorted({p.log_path for p in self.procs if p.log_path.exists()})


def _check_available() -> None:
    if os.geteuid() != 0:
        raise HarnessUnavailable("network namespaces need root (euid is not 0)")
    if not shutil.which("ip"):
        raise HarnessUnavailable("iproute2 'ip' command not found")
    probe = f"oxprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        raise HarnessUnavailable(f"'ip netns add' failed: {res.stderr.strip()}")
    sh(["ip", "netns", "del", probe], check=False)


def _pick_subnet() -> ipaddress.IPv4Network:
    """The first 10.250.X.0/24 that overlaps no route or address on this machine."""
    used = []
    for line in sh(["ip", "-4", "route", "show", "table", "all"]).splitlines() + \
            sh(["ip", "-4", "-o", "addr"]).splitlines():
        for tok in re.findall(r"\d+\.\d+\.\d+\.\d+(?:/\d+)?", line):
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(tok, strict=False))
    for x in range(1, 255):
        cand = ipaddress.ip_network(f"{_SUBNET_BASE}.{x}.0/24")
        if not any(cand.overlaps(u) for u in used if u.prefixlen > 0):
            return cand
    raise HarnessError(f"no free {_SUBNET_BASE}.X.0/24 subnet")


def leftovers(network: Network) -> list[str]:
    """Names of this network's namespaces and links that still exist."""
    netns = set(sh(["ip", "netns", "list"], check=False).split())
    links = sh(["ip", "-o", "link"], check=False)
    left = [ns for ns in network.registry.data["netns"] if ns in netns]
    left += [ln for ln in network.registry.data["links"]
             if re.search(rf"^\d+: {re.escape(ln)}[@:]", links, re.M)]
    left += [f"pid {p.pid}" for p in network.procs if _pid_alive(p.pid)]
    return left


# --------------------------------------------------------------------------- agent


USE_AGENT_SECRET = object()
"""Default for ``secret=``: send the Agent's own secret. Pass ``None`` to send none."""


class Agent:
    """One oxide-cluster node on a host: lifecycle plus an HTTP client pinned to it.

    The harness knows no agent options: ``argv`` is the full command line.
    HTTP methods return ``(status, body, headers)`` for every HTTP status (body is parsed
    JSON when it parses, else bytes; headers is a dict with lower-case names) and raise
    ``NodeUnreachable`` when no HTTP response arrives (refused, reset, timeout).
    """

    def __init__(self, host: Host, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 state_dir: Path | str | None = None, api_port: int = 4000,
                 secret: str | None = None, log_path: Path | str | None = None,
                 timeout: float = 2.0):
        self.host = host
        self.argv = list(argv)
        self.env = dict(env or {})
        self.state_dir = Path(state_dir) if state_dir else None
        self.api_port = api_port
        self.secret = secret
        self.timeout = timeout
        self.log_path = Path(log_path) if log_path else \
            host.network.log_dir / f"{host.name}-agent.log"
        self.proc: Proc | None = None

    def __repr__(self) -> str:
        return f"<Agent {self.host.name} {self.base_url} alive={self.alive}>"

    @property
    def base_url(self) -> str:
        return f"http://{self.host.ip}:{self.api_port}"

    # -- lifecycle

    def start(self) -> Agent:
        assert not self.alive, f"{self} already running"
        if self.state_dir:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self.proc = self.host.spawn(self.argv, self.env, self.log_path)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout``; return the exit code (negative: signal)."""
        assert self.proc is not None, "not started"
        return self.proc.terminate(timeout)

    def kill(self) -> int:
        """SIGKILL the agent and its task processes: the host "dies"."""
        assert self.proc is not None, "not started"
        return self.proc.kill_tree()

    def pause(self) -> None:
        assert self.proc is not None, "not started"
        self.proc.signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None, "not started"
        self.proc.signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> Agent:
        if self.alive:
            self.stop(timeout)
        return self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_http(self, path: str = "/health", timeout: float = 15.0) -> Any:
        """Poll until ``path`` answers 200 (fails early with the log if the agent died)."""
        def ready() -> bool:
            if not self.alive:
                raise AssertionError(f"{self} exited; log:\n{self.log_text()[-3000:]}")
            return self.get(path)[0] == 200
        return poll_until(ready, timeout, message=f"{self} not answering {path}")

    # -- HTTP

    def get(self, path: str, secret: Any = USE_AGENT_SECRET,
            timeout: float | None = None) -> tuple[int, Any, dict[str, str]]:
        return self.request("GET", path, None, secret, timeout)

    def post(self, path: str, json_body: Any = None, secret: Any = USE_AGENT_SECRET,
             timeout: float | None = None) -> tuple[int, Any, dict[str, str]]:
        body = b"" if json_body is None else json.dumps(json_body).encode()
        return self.request("POST", path, body, secret, timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                secret: Any = USE_AGENT_SECRET, timeout: float | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        """http.client, not urllib: no proxy environment variables, no redirects."""
        hdrs = dict(headers or {})
        if secret is USE_AGENT_SECRET:
            secret = self.secret
        if secret is not None:
            hdrs["X-Cluster-Secret"] = secret
        if body is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection(self.host.ip, self.api_port,
                                          timeout=timeout or self.timeout)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise NodeUnreachable(f"{method} {self.base_url}{path}: {exc!r}") from exc
        finally:
            conn.close()
        try:
            parsed: Any = json.loads(raw) if raw else raw
        except ValueError:
            parsed = raw
        return resp.status, parsed, {k.lower(): v for k, v in resp.getheaders()}


# --------------------------------------------------------------------------- faults


def _nft(host: Host, *args: str) -> None:
    res = host.run(["nft", *args])
    if res.returncode != 0:
        raise HarnessError(f"nft {' '.join(args)} in {host.netns}: {res.stderr.strip()}")


def _fault_chain(host: Host) -> None:
    _nft(host, "add", "table", "inet", FAULT_TABLE)
    _nft(host, "add chain inet " + FAULT_TABLE + " in { type filter hook input priority 0; }")


def drop_udp(host: Host, port: int = DISCOVERY_PORT, percent: int = 100) -> None:
    """Drop ``percent`` % of UDP datagrams arriving at ``host`` for ``port`` (nftables)."""
    if not 0 < percent <= 100:
        raise ValueError("percent must be in 1..100")
    _fault_chain(host)
    rule = f"add rule inet {FAULT_TABLE} in udp dport {port}"
    if percent < 100:
        rule += f" numgen random mod 100 < {percent}"
    _nft(host, rule + " drop")


def drop_from(host: Host, src_ip: str) -> None:
    """Drop everything ``host`` receives from ``src_ip`` (a one-way partition)."""
    _fault_chain(host)
    _nft(host, f"add rule inet {FAULT_TABLE} in ip saddr {src_ip} drop")


def drop_broadcast(host: Host) -> None:
    """Drop every link-layer broadcast ``host`` receives (a network that filters broadcast)."""
    _fault_chain(host)
    _nft(host, f"add rule inet {FAULT_TABLE} in meta pkttype broadcast drop")


def route_multicast(host: Host) -> None:
    """Send IPv4 multicast out of the host's eth0 (the namespaces have no default route)."""
    res = host.run(["ip", "route", "replace", "224.0.0.0/4", "dev", "eth0"])
    if res.returncode != 0:
        raise HarnessError(f"multicast route in {host.netns}: {res.stderr.strip()}")


def drop_replies(host: Host, src_ip: str, port: int) -> None:
    """Lose the answers ``host`` gets from ``src_ip``'s TCP ``port`` *after* its requests
    arrived there: segments carrying data are dropped, handshakes and bare ACKs pass
    (an IPv4 packet over 100 bytes carries data; an ACK with every option is at most 80)."""
    _fault_chain(host)
    _nft(host, f"add rule inet {FAULT_TABLE} in ip saddr {src_ip} tcp sport {port} "
         "ip length > 100 drop")


def clear_faults(host: Host) -> None:
    """Remove every nft fault rule and bring the link back up."""
    host.run(["nft", "delete", "table", "inet", FAULT_TABLE])
    link_up(host)


def link_down(host: Host) -> None:
    """Pull the cable: the bridge end of the host's veth goes down (host keeps its IP)."""
    sh(["ip", "link", "set", host.veth, "down"])


def link_up(host: Host) -> None:
    sh(["ip", "link", "set", host.veth, "up"])


_SEND_SNIPPET = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if sys.argv[4] == "1":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for _ in range(int(sys.argv[5])):
    s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
"""


def send_udp(host: Host, dst_ip: str, port: int, payload: bytes,
             broadcast: bool = False, count: int = 1) -> None:
    """Send a raw datagram (``count`` times) from inside ``host``'s namespace.

    For forgery and replay tests: the bytes go out exactly as given.
    """
    res = host.run([sys.executable, "-c", _SEND_SNIPPET, dst_ip, str(port), payload.hex(),
                    "1" if broadcast else "0", str(count)])
    if res.returncode != 0:
        raise HarnessError(f"send_udp from {host.name} failed: {res.stderr.strip()}")


_SINK_SNIPPET = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
out = open(sys.argv[2], "a")
print("READY", file=out, flush=True)
while True:
    data, addr = s.recvfrom(65535)
    print(addr[0], data.hex(), file=out, flush=True)
"""


class UdpSink:
    """Records every datagram arriving on a UDP port inside a host (0.0.0.0:port)."""

    def __init__(self, host: Host, port: int, path: Path | str | None = None):
        self.path = Path(path) if path else \
            host.network.log_dir / f"{host.name}-udpsink-{port}.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.proc = host.spawn([sys.executable, "-u", "-c", _SINK_SNIPPET, str(port),
                                str(self.path)],
                               log_path=host.network.log_dir / f"{host.name}-udpsink.log")
        poll_until(lambda: "READY" in self.path.read_text(), 10,
                   message=f"UDP sink on {host.name}:{port} did not start")

    def datagrams(self) -> list[tuple[str, bytes]]:
        """(source ip, payload) of everything received so far."""
        out = []
        for line in self.path.read_text().splitlines()[1:]:
            src, _, hexdata = line.partition(" ")
            out.append((src, bytes.fromhex(hexdata)))
        return out

    def stop(self) -> None:
        self.proc.kill_tree()


# --------------------------------------------------------------------------- redis


class RedisServer:
    """A real redis-server on the bridge address (.1) so every host reaches it."""

    def __init__(self, network: Network, port: int | None = None, appendonly: bool = False):
        self.network = network
        self.host_ip = network.gateway
        self.port = port or free_port(self.host_ip)
        self.log_path = network.log_dir / "redis.log"
        self.appendonly = appendonly
        self.data_dir = network.log_dir / f"redis-{self.port}-data"
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host_ip}:{self.port}"

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(self.port), "--bind", self.host_ip,
                "127.0.0.1", "--save", "", "--dir", str(self.data_dir),
                "--appendonly", "yes" if self.appendonly else "no", "--protected-mode", "no",
                "--daemonize", "no", "--logfile", ""]
        self.proc = self.network.spawn_root(argv, self.log_path)
        poll_until(self.ping, 10, message=f"redis-server on {self.url} not answering PING")
        return self

    def ping(self) -> bool:
        """PING over a raw socket (no client library needed); False if not answering."""
        try:
            with socket.create_connection((self.host_ip, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> int:
        assert self.proc is not None, "not started"
        return self.proc.terminate(timeout)

    def kill(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.kill_tree()

    def restart(self) -> RedisServer:
        """Stop and start again on the same port (data is gone, unless ``appendonly``:
        then it is read back from the append-only file)."""
        if self.proc and self.proc.alive:
            self.stop()
        return self.start()


@contextlib.contextmanager
def network(n_hosts: int, log_dir: Path | str | None = None,
            name_prefix: str = "ox") -> Iterator[Network]:
    """Functional spelling of ``with Network(...)``."""
    with Network(name_prefix, n_hosts, log_dir) as net:
        yield net

"""Fault injection under steady load: kill -9, SIGSTOP, Redis restart/FLUSHALL, partition.

Each scenario runs real agents in network namespaces with a real ``redis-server`` (see
``test_leader_cluster.py``), injects faults while a generator submits short tasks, and
asserts only safety properties strictly: never two leaders at once, every accepted task
reaches a terminal state (a dead owner's unfinished task becomes ``lost``), no task
process outlives the scenario. Timing figures are measured and printed, never asserted
tightly (CI is a loaded 2-core machine). Each scenario appends a row to the session's
fault report, printed at the end of the run (``conftest.pytest_terminal_summary``).

Leader samples come from one small sampler process per host, *inside* the host's
namespace, so a partitioned host is still observed. A sample "I lead with token T" proves
that node led inside the request's [sent, received] window (CLOCK_MONOTONIC is
system-wide); the proven terms of different nodes must never overlap.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import harness
import oxide
import psutil
import pytest
from harness import NodeUnreachable, poll_until
from oxide import OxideNode

from tests.cluster.test_leader_cluster import agreed_leader, wait_for_leader
from tests.support import SECRET

TTL = 2.0
RATE = 10.0  # task submissions per second
TASK = {"command": "sh", "args": ["-c", "sleep 0.5"]}  # ~5 running at a time
# The load's task: TASK that first appends its OXIDE_TASK_ID to a marker file shared by
# every host (network namespaces share the file system), so a second run shows up.
_MARK = 'echo "$OXIDE_TASK_ID" >> "$1"; sleep "$2"'
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out", "lost", "rejected"}

_SAMPLER = """
import http.client, json, os, sys, time
ip, out = sys.argv[1], open(sys.argv[2], "a")
while True:
    sent = time.monotonic()
    try:
        conn = http.client.HTTPConnection(ip, 4000, timeout=0.5)
        conn.request("GET", "/api/cluster/leader",
                     headers={"X-Cluster-Secret": os.environ["OXIDE_CLUSTER_SECRET"]})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status == 200:
            view = json.loads(body)
            print(json.dumps([sent, time.monotonic(), view["node_id"], view["token"]]),
                  file=out, flush=True)
    except Exception:
        pass
    time.sleep(0.02)
"""

_POST = """
import http.client, json, os, sys
conn = http.client.HTTPConnection(sys.argv[1], 4000, timeout=15)
conn.request("POST", "/execute?wait=10", body=sys.argv[2],
             headers={"X-Cluster-Secret": os.environ["OXIDE_CLUSTER_SECRET"],
                      "Content-Type": "application/json"})
resp = conn.getresponse()
print(json.dumps([resp.status, json.loads(resp.read() or b"null")]))
"""


# --------------------------------------------------------------------------- leader samples


class LeaderSampler:
    """One sampler process per node, in the node's namespace, writing JSON lines."""

    def __init__(self, nodes: Sequence[OxideNode], log_dir: Path) -> None:
        self.ids = {n.name: n.node_id for n in nodes}  # read while every node answers
        self.files = {n.name: log_dir / f"{n.name}-leader-samples.jsonl" for n in nodes}
        self.procs = []
        for node in nodes:
            self.files[node.name].write_text("")
            self.procs.append(node.host.spawn(
                [sys.executable, "-u", "-c", _SAMPLER, node.host.ip,
                 str(self.files[node.name])],
                env={"OXIDE_CLUSTER_SECRET": SECRET},
                log_path=log_dir / f"{node.name}-sampler.log"))

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.kill_tree()

    def samples(self, name: str) -> list[tuple[float, float, str | None, int | None]]:
        out = []
        for line in self.files[name].read_text().splitlines():
            with contextlib.suppress(ValueError):
                sent, received, node_id, token = json.loads(line)
                out.append((sent, received, node_id, token))
        return out

    def latest(self, name: str, after: float) -> tuple[str | None, int | None] | None:
        """The newest view of node ``name`` sent after ``after`` (monotonic), if any."""
        fresh = [s for s in self.samples(name) if s[0] > after]
        return (fresh[-1][2], fresh[-1][3]) if fresh else None

    def terms(self) -> dict[tuple[str, str, int], list[float]]:
        """(name, node_id, token) -> [first received, last sent] of "I lead" samples."""
        terms: dict[tuple[str, str, int], list[float]] = {}
        for name, own in self.ids.items():
            for sent, received, node_id, token in self.samples(name):
                if node_id == own and token is not None:
                    term = terms.setdefault((name, own, token), [received, sent])
                    term[0] = min(term[0], received)
                    term[1] = max(term[1], sent)
        return terms

    def overlaps(self) -> list[str]:
        """Every pair of different nodes' proven terms that overlap (split brain)."""
        terms = sorted(self.terms().items(), key=lambda item: item[0][2])
        found = []
        for i, ((name_a, _, token_a), (start_a, end_a)) in enumerate(terms):
            for (name_b, _, token_b), (start_b, end_b) in terms[i + 1:]:
                overlap = min(end_a, end_b) - max(start_a, start_b)
                if name_a != name_b and overlap > 0:
                    found.append(f"{name_a}:{token_a} and {name_b}:{token_b} both led "
                                 f"for {overlap:.3f} s")
        return found

    def total(self) -> int:
        return sum(len(self.samples(name)) for name in self.ids)


@pytest.fixture
def samplers() -> Any:
    made: list[LeaderSampler] = []

    def make(nodes: Sequence[OxideNode], log_dir: Path) -> LeaderSampler:
        made.append(LeaderSampler(nodes, log_dir))
        return made[-1]
    yield make
    for sampler in made:
        sampler.stop()


# --------------------------------------------------------------------------- load


class Load:
    """Submits ``TASK`` at a steady rate, round-robin over ``targets`` (a live list).

    Documented refusals (429/503 with Retry-After) and connection errors are retried on
    the next target, a few times; anything else is counted under ``other``. A task is
    accepted when a node answers 200/202 with an id.
    """

    ATTEMPTS = 8

    def __init__(self, targets: list[OxideNode], marker: Path, rate: float = RATE) -> None:
        self.targets = targets
        self.marker = marker
        self.task = marked_task(marker)
        self.interval = 1.0 / rate
        self.accepted: dict[str, dict[str, Any]] = {}
        self.submitted = self.refused = self.unreachable = self.gave_up = 0
        self.other: dict[int, int] = {}
        self.other_examples: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=24)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._next = 0

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._pool.shutdown(wait=True)

    def _target(self) -> OxideNode:
        with self._lock:
            targets = list(self.targets)
            self._next += 1
            return targets[self._next % len(targets)]

    def _run(self) -> None:
        while not self._stop.is_set():
            self._pool.submit(self._one)
            self._stop.wait(self.interval)

    def _one(self) -> None:
        with self._lock:
            self.submitted += 1
        for _ in range(self.ATTEMPTS):
            node = self._target()
            try:
                status, body, headers = node.agent.post("/execute", self.task, timeout=10)
            except NodeUnreachable:
                with self._lock:
                    self.unreachable += 1
                self._stop.wait(0.1)
                continue
            if status in (200, 202) and isinstance(body, dict) and body.get("id"):
                with self._lock:
                    self.accepted[body["id"]] = body
                self._follow(node, body["id"])
                return
            if status in (429, 503) and "retry-after" in headers:
                with self._lock:
                    self.refused += 1
                self._stop.wait(min(float(headers["retry-after"]), 1.0))
                continue
            with self._lock:
                self.other[status] = self.other.get(status, 0) + 1
                self.other_examples.append((node.name, status, body))
            return
        with self._lock:
            self.gave_up += 1

    def _follow(self, node: OxideNode, task_id: str) -> None:
        """Long-poll the task once, so an end seen before a fault is on record."""
        with contextlib.suppress(NodeUnreachable):
            status, body, _ = node.agent.get(f"/task/{task_id}?wait=10", timeout=15)
            if status == 200 and body["state"] in TERMINAL:
                with self._lock:
                    self.accepted[task_id] = body


# --------------------------------------------------------------------------- checks


def marked_task(marker: Path, seconds: float = 0.5) -> dict[str, Any]:
    """TASK (``seconds`` long), recording each start of it as one line (its id) in
    ``marker``."""
    marker.touch()
    marker.chmod(0o666)  # whatever user the agents run tasks as
    return {"command": "sh", "args": ["-c", _MARK, "sh", str(marker), f"{seconds:g}"]}


def ran_twice(marker: Path, final: dict[str, str]) -> list[str]:
    """Task ids that started more than once (appended to ``marker`` more than once).

    Call after orphan_count(): every task process has ended, so every start is written.
    Every succeeded task must have written its id, or the marker proves nothing."""
    starts = collections.Counter(marker.read_text().split())
    unmarked = [tid for tid, state in final.items() if state == "succeeded" and tid not in starts]
    assert not unmarked, f"succeeded without a start in {marker}: {unmarked[:5]}"
    return sorted(tid for tid, count in starts.items() if count > 1)


def task_procs(node_ids: Sequence[str]) -> list[psutil.Process]:
    """Live processes of tasks run by any of ``node_ids`` (the ``OXIDE_NODE_ID`` every
    task gets; with Redis an id names the node the task entered, not the one it ran on)."""
    found = []
    for process in psutil.process_iter(["environ", "status"]):
        environ = process.info["environ"] or {}
        if environ.get("OXIDE_TASK_ID") and environ.get("OXIDE_NODE_ID") in node_ids and \
                process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def settle(load: Load, live: Sequence[OxideNode], dead_ids: Sequence[str],
           running_at_death: set[str], timeout: float = 40.0) -> dict[str, str]:
    """Ask live nodes until every accepted task is accounted for; return id -> state.

    A task whose owner is alive must have succeeded. A task whose process was running
    when its owner was killed must be ``lost``, on every node asked. A dead owner's other
    tasks may have ended before the kill, unseen (their record died with the owner): they
    are ``lost`` or answered 503 ``node_unavailable`` ("unknown", counted apart).
    """
    final = {tid: body["state"] for tid, body in load.accepted.items()
             if body["state"] in TERMINAL}

    # Where each task ran, as the latest answer says (a queued task learns its node late).
    runner = {tid: body.get("node_id") for tid, body in load.accepted.items()}

    def ran_on_dead(tid: str) -> bool:
        return runner[tid] in dead_ids

    pending = [tid for tid in load.accepted if tid not in final]
    turn = [0]

    def ask() -> bool:
        for tid in list(pending):
            turn[0] += 1
            node = live[turn[0] % len(live)]
            status, body, _ = node.agent.get(f"/task/{tid}", timeout=5)
            if status == 200 and body["state"] in TERMINAL:
                final[tid] = body["state"]
                runner[tid] = body["node_id"]
                pending.remove(tid)
            elif (status == 503 and tid not in running_at_death and ran_on_dead(tid)
                  and body["error"]["code"] == "node_unavailable"):
                final[tid] = "unknown"
                pending.remove(tid)
        return not pending
    poll_until(ask, timeout, interval=0.2, message=f"accepted tasks still unfinished: "
               f"{pending[:5]}")
    for tid in running_at_death & set(load.accepted):
        for node in live:  # lost on every live node, not only the one asked
            status, body, _ = node.agent.get(f"/task/{tid}", timeout=5)
            assert status == 200 and body["state"] == "lost", (tid, node, status, body)
    for tid, state in final.items():
        if ran_on_dead(tid):
            assert state in ("succeeded", "lost", "unknown"), (tid, state)
        else:
            assert state == "succeeded", (tid, state, load.accepted[tid])
    return final


def orphan_count(node_ids: Sequence[str]) -> int:
    """After settle(): task processes still alive after a grace (must be 0)."""
    try:
        poll_until(lambda: not task_procs(node_ids), 15, interval=0.1)
    except AssertionError:
        left = task_procs(node_ids)
        for process in left:
            with contextlib.suppress(Exception):
                process.kill()
        return len(left)
    return 0


def kill_with_tasks(node: OxideNode) -> set[str]:
    """kill -9 the agent and its task processes (a dead host); return the ids of the
    tasks that were running. The agent is frozen first, so no task it saw running can be
    recorded as ended between the look and the kill."""
    node.agent.pause()
    running = {p.environ()["OXIDE_TASK_ID"] for p in task_procs([node.node_id])}
    node.kill()
    return running


def row(report: list[dict[str, Any]], scenario: str, faults: str, load: Load | None,
        final: dict[str, str], changes: int, split: int, orphans: int, killed: int,
        twice: list[str]) -> None:
    entry = {
        "scenario": scenario, "faults injected": faults,
        "submitted": load.submitted if load else len(final),
        "accepted": len(load.accepted) if load else len(final),
        "finished": sum(s == "succeeded" for s in final.values()),
        "lost": sum(s == "lost" for s in final.values()),
        "unknown": sum(s == "unknown" for s in final.values()),
        "refused": load.refused if load else 0,
        "leader changes": changes, "split-brain": split, "orphans": orphans,
        "killed w/ agent": killed, "ran twice": len(twice),
    }
    report.append(entry)
    print(f"\n{scenario}: {entry}")
    if twice:
        print(f"  ran twice: {twice[:10]}")
    if load:
        print(f"  unreachable retries {load.unreachable}, gave up {load.gave_up}, "
              f"other statuses {load.other} {load.other_examples[:3]}")


@pytest.fixture
def fault_cluster(network: Callable[[int], harness.Network], redis_server: Any,
                  tmp_path: Path) -> Callable[..., tuple[oxide.Cluster, harness.RedisServer]]:
    """Factory: N agents electing through one real redis-server; waits for one leader."""
    def make(n_hosts: int = 3, extra_args: Sequence[str] = (), appendonly: bool = False
             ) -> tuple[oxide.Cluster, harness.RedisServer]:
        net = network(n_hosts)
        redis = redis_server(net, appendonly)
        args = ("--redis", redis.url, "--leader-ttl", str(TTL), "--max-tasks", "8",
                *extra_args)
        c = oxide.Cluster(net, tmp_path / f"{net.log_dir.name}-agents", args)
        c.start(net.hosts)
        c.wait_meshed(timeout=30)
        wait_for_leader(c.nodes, timeout=30)
        for node in c.nodes:
            assert node.node_id  # cache ids while every node answers
        return c, redis
    return make


def run_for(seconds: float) -> None:
    """Let the load run (a paced wait, not a sleep in the assertion sense)."""
    threading.Event().wait(seconds)


# --------------------------------------------------------------------------- scenarios


@pytest.mark.slow
def test_leader_kill_9_under_load(fault_cluster, samplers, fault_report, tmp_path):
    c, _ = fault_cluster(3)
    ids = [n.node_id for n in c.nodes]
    sampler = samplers(c.nodes, c.net.log_dir)
    leader, token = wait_for_leader(c.nodes)
    targets = list(c.nodes)
    with Load(targets, tmp_path / "starts") as load:
        run_for(3)
        with load._lock:
            targets.remove(leader)
        t0 = time.monotonic()
        running = kill_with_tasks(leader)
        survivors = [n for n in c.nodes if n is not leader]
        new, new_token = wait_for_leader(survivors, newer_than=token, timeout=20)
        failover = time.monotonic() - t0
        run_for(5)
    final = settle(load, survivors, [leader.node_id], running)
    orphans = orphan_count(ids)
    twice = ran_twice(load.marker, final)
    sampler.stop()
    split = sampler.overlaps()
    changes = len(sampler.terms()) - 1
    row(fault_report, "leader kill -9", f"kill -9 {leader.name} (leader)", load, final,
        changes, len(split), orphans, len(running), twice)
    print(f"  new leader {new.name} token {token} -> {new_token} after {failover:.2f} s; "
          f"{sampler.total()} leader samples")
    assert not split, split
    assert orphans == 0
    assert not twice, twice
    assert len(load.accepted) > 0


@pytest.mark.slow
def test_leader_sigstop_past_ttl_under_load(fault_cluster, samplers, fault_report, tmp_path):
    c, _ = fault_cluster(3)
    ids = [n.node_id for n in c.nodes]
    sampler = samplers(c.nodes, c.net.log_dir)
    leader, token = wait_for_leader(c.nodes)
    others = [n for n in c.nodes if n is not leader]
    targets = list(c.nodes)
    with Load(targets, tmp_path / "starts") as load:
        run_for(3)
        with load._lock:
            targets.remove(leader)
        frozen = time.monotonic()
        leader.agent.pause()
        try:
            new, new_token = wait_for_leader(others, newer_than=token, timeout=20)
            failover = time.monotonic() - frozen
            poll_until(lambda: time.monotonic() > frozen + 1.5 * TTL, 10,
                       message="the leader to stay frozen past its ttl")
        finally:
            leader.agent.resume()
        with load._lock:
            targets.append(leader)
        # The old leader learns the new one; all three agree again.
        agreed, agreed_token = wait_for_leader(c.nodes, newer_than=token, timeout=20)
        run_for(5)
    final = settle(load, c.nodes, [], set())
    orphans = orphan_count(ids)
    twice = ran_twice(load.marker, final)
    sampler.stop()
    split = sampler.overlaps()
    changes = len(sampler.terms()) - 1
    row(fault_report, "leader SIGSTOP", f"SIGSTOP {leader.name} (leader) "
        f"{1.5 * TTL:.0f}s", load, final, changes, len(split), orphans, 0, twice)
    print(f"  new leader {new.name} token {token} -> {new_token} after {failover:.2f} s; "
          f"agreed leader after SIGCONT: {agreed.name}:{agreed_token}")
    assert not split, split
    assert orphans == 0
    assert not twice, twice


def flushall(redis: harness.RedisServer) -> None:
    harness.sh(["redis-cli", "-h", redis.host_ip, "-p", str(redis.port), "FLUSHALL"])


@pytest.mark.slow
def test_redis_restart_and_flushall_under_load(fault_cluster, samplers, fault_report, tmp_path):
    c, redis = fault_cluster(3)
    ids = [n.node_id for n in c.nodes]
    sampler = samplers(c.nodes, c.net.log_dir)
    _leader, token = wait_for_leader(c.nodes)
    with Load(list(c.nodes), tmp_path / "starts") as load:
        run_for(3)
        t0 = time.monotonic()
        redis.restart()
        _, token2 = wait_for_leader(c.nodes, newer_than=token, timeout=25)
        after_restart = time.monotonic() - t0
        run_for(2)
        t1 = time.monotonic()
        flushall(redis)
        leader3, token3 = wait_for_leader(c.nodes, newer_than=token2, timeout=25)
        after_flush = time.monotonic() - t1
        run_for(3)
    final = settle(load, c.nodes, [], set())
    orphans = orphan_count(ids)
    twice = ran_twice(load.marker, final)
    sampler.stop()
    split = sampler.overlaps()
    changes = len(sampler.terms()) - 1
    row(fault_report, "redis restart+FLUSHALL", "redis restart; FLUSHALL", load, final,
        changes, len(split), orphans, 0, twice)
    print(f"  leader again {after_restart:.2f} s after the restart (token {token} -> "
          f"{token2}), {after_flush:.2f} s after FLUSHALL ({leader3.name}, token {token3})")
    assert not split, split
    assert orphans == 0
    assert not twice, twice
    assert agreed_leader(c.nodes) is not None


def post_inside(node: OxideNode, body: dict[str, Any]) -> tuple[int, Any]:
    """POST /execute?wait=10 from inside the node's own namespace (it may be cut off)."""
    res = node.host.run([sys.executable, "-c", _POST, node.host.ip, json.dumps(body)],
                        env={"OXIDE_CLUSTER_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
                        timeout=30)
    if res.returncode != 0:
        raise AssertionError(f"POST inside {node.host.name}: {res.stderr[-2000:]}")
    status, reply = json.loads(res.stdout)
    return status, reply


@pytest.mark.slow
def test_partition_of_the_leader_and_one_follower(fault_cluster, samplers, fault_report, tmp_path):
    c, _ = fault_cluster(5)
    ids = [n.node_id for n in c.nodes]
    sampler = samplers(c.nodes, c.net.log_dir)
    leader, token = wait_for_leader(c.nodes)
    minority = [leader, next(n for n in c.nodes if n is not leader)]
    marker = tmp_path / "starts"
    task = marked_task(marker)
    majority = [n for n in c.nodes if n not in minority]
    final: dict[str, str] = {}
    cut = time.monotonic()
    try:
        for node in minority:
            harness.link_down(node.host)
        new, new_token = wait_for_leader(majority, newer_than=token, timeout=25)
        failover = time.monotonic() - cut
        # The minority cannot reach Redis: after at most a ttl it names no leader.
        for node in minority:
            poll_until(lambda node=node: sampler.latest(node.name, cut) == (None, None),
                       20, interval=0.1,
                       message=f"{node.name} (cut off) to name no leader")
        no_leader_after = time.monotonic() - cut
        # Work during the partition: the majority places it; the minority admits it
        # locally or refuses with Retry-After.
        status, reply, _ = majority[0].agent.post("/execute?wait=10", task, timeout=15)
        assert status == 200 and reply["state"] == "succeeded", (status, reply)
        final[reply["id"]] = reply["state"]
        minority_answers = []
        for node in minority:
            status, reply = post_inside(node, task)
            minority_answers.append(status)
            assert status in (200, 202, 429, 503), (node, status, reply)
            if status in (200, 202):
                assert reply["node_id"] in (m.node_id for m in minority), reply
                final[reply["id"]] = reply["state"]
    finally:
        healed = time.monotonic()
        for node in minority:
            harness.link_up(node.host)
    agreed, agreed_token = poll_until(lambda: agreed_leader(c.nodes), 30, interval=0.1,
                                      message="one leader seen by all five after healing")
    c.wait_meshed(timeout=30)
    converged = time.monotonic() - healed
    views = {(n.nodes()["total_nodes"], n.nodes()["leader"]["node_id"]) for n in c.nodes}
    assert views == {(5, agreed.node_id)}, views
    for tid, state in list(final.items()):
        if state not in TERMINAL:
            final[tid] = poll_until(
                lambda tid=tid: (lambda s: s if s in TERMINAL else None)(
                    c.nodes[0].get_json(f"/task/{tid}")["state"]), 20,
                message=f"{tid} to end")
    assert all(s in TERMINAL for s in final.values()), final
    orphans = orphan_count(ids)
    twice = ran_twice(marker, final)
    sampler.stop()
    split = sampler.overlaps()
    minority_claims = [(node.name, tok) for node in minority
                       for sent, _, nid, tok in sampler.samples(node.name)
                       if cut < sent < healed and nid == node.node_id
                       and tok is not None and tok >= new_token]
    changes = len(sampler.terms()) - 1
    row(fault_report, "partition 2|3", f"link_down {minority[0].name} (leader), "
        f"{minority[1].name}", None, final, changes, len(split), orphans, 0, twice)
    print(f"  majority leader {new.name} token {token} -> {new_token} after "
          f"{failover:.2f} s; minority named no leader after {no_leader_after:.2f} s and "
          f"answered {minority_answers}; after healing all five agree on "
          f"{agreed.name}:{agreed_token} and are meshed after {converged:.2f} s")
    assert not split, split
    assert not minority_claims, minority_claims
    assert orphans == 0
    assert not twice, twice


# --------------------------------------------------------------------------- stalls, lost replies

# The stall and reply-loss scenarios run their agents with --peer-timeout PEER_TIMEOUT (the
# default is 30 s): a forward to the leader gives up after SUBMIT_WAIT + PEER_TIMEOUT.
PEER_TIMEOUT = 4.0
SUBMIT_WAIT = 1
_ADMITTED = re.compile(r"task (\S+) was admitted before")


def submit(node: OxideNode, task: dict[str, Any]) -> tuple[int, Any, float]:
    """POST /execute?wait=SUBMIT_WAIT to ``node``: (status, body, seconds to the answer)."""
    t0 = time.monotonic()
    status, body, _ = node.agent.post(f"/execute?wait={SUBMIT_WAIT}", task, timeout=120)
    return status, body, time.monotonic() - t0


def answered_id(status: int, body: Any) -> str:
    """The task a submit's answer names. An answer must name one: queued/started (200/202)
    or a clear refusal naming the id; a client told nothing cannot know whether to retry."""
    if status in (200, 202) and isinstance(body, dict) and body.get("id"):
        assert body["state"] in TERMINAL | {"queued", "running"}, body
        return str(body["id"])
    message = body.get("error", {}).get("message", "") if isinstance(body, dict) else ""
    found = _ADMITTED.search(message)
    assert status == 409 and found, f"a submit answered {status} {body!r}: no task named"
    return found.group(1)


def brief(answers: Sequence[tuple[int, Any, float]]) -> list[tuple[int, Any, float]]:
    """(status, state or body, seconds) of each submit, for the report."""
    return [(status, body.get("state") if isinstance(body, dict) else body, round(took, 2))
            for status, body, took in answers]


def end_of(nodes: Sequence[OxideNode], task_id: str, timeout: float = 60.0) -> str:
    """The terminal state of ``task_id`` as the first of ``nodes`` to know it says."""
    def ended() -> str | None:
        for node in nodes:
            with contextlib.suppress(NodeUnreachable):
                status, body, _ = node.agent.get(f"/task/{task_id}", timeout=5)
                if status == 200 and body["state"] in TERMINAL:
                    return str(body["state"])
        return None
    state: str = poll_until(ended, timeout, interval=0.2, message=f"task {task_id} to end")
    return state


def runs_twice_or_unasked(marker: Path, final: dict[str, str]) -> list[str]:
    """ran_twice(), plus every run under an id no submit was answered with (a second run
    of a task under a new id, as a leader's local fallback once made)."""
    starts = collections.Counter(marker.read_text().split())
    return ran_twice(marker, final) + sorted(f"{tid} (unasked)" for tid in starts
                                             if tid not in final)


def gave_up_on_leader(nodes: Sequence[OxideNode], task_ids: Sequence[str]) -> list[str]:
    """Ids whose forward to the leader timed out, as the followers' logs say."""
    logs = "".join(node.agent.log_text() for node in nodes)
    return [tid for tid in task_ids
            if re.search(rf"leader \S+ unreachable: task {re.escape(tid)} stays queued", logs)]


def submit_while_started(marker: Path, submits: Sequence[tuple[OxideNode, dict[str, Any]]]
                         ) -> list[tuple[int, Any, float]]:
    """submit() each (node, task) at once; assert every task started (its line in
    ``marker``) while no submit was answered yet: the requests arrived, the answers are
    what got lost. The answers, in order."""
    with ThreadPoolExecutor(len(submits)) as pool:
        futures = [pool.submit(submit, node, task) for node, task in submits]
        poll_until(lambda: len(marker.read_text().split()) >= len(submits), 60,
                   interval=0.05, message="every task to start while its submit waits")
        assert not any(f.done() for f in futures), [f.result() for f in futures if f.done()]
        return [f.result() for f in futures]


def drain_stale_requests(node: OxideNode, task: dict[str, Any]) -> str:
    """A fresh task through ``node`` once it is back: its answer comes after the node read
    every request that waited in its sockets (one reactor reads them in order)."""
    status, body, _ = node.agent.post("/execute?wait=10", task, timeout=30)
    assert status == 200 and body["state"] == "succeeded", (status, body)
    return str(body["id"])


def fill_slots(node: OxideNode, release: Path, slots: int) -> None:
    """Take every slot of ``node`` with a task pinned there until ``release`` exists, so
    a submit there is not started where it entered (``start_first``) but goes to the
    leader."""
    blocker = {"command": "sh", "args": ["-c", f"while [ ! -e {release} ]; do sleep 0.05; "
                                         "done"], "node": node.node_id}
    for _ in range(slots):
        status, body, _ = node.agent.post("/execute", blocker, timeout=30)
        assert status == 202 and body["state"] == "running", (status, body)


@pytest.mark.slow
def test_leader_sigstop_past_the_forward_timeout_runs_each_task_once(
        fault_cluster, samplers, fault_report, tmp_path):
    c, _ = fault_cluster(3, ("--peer-timeout", str(PEER_TIMEOUT), "--max-tasks", "2"))
    ids = [n.node_id for n in c.nodes]
    sampler = samplers(c.nodes, c.net.log_dir)
    leader, token = wait_for_leader(c.nodes)
    followers = [n for n in c.nodes if n is not leader]
    marker = tmp_path / "starts"
    task = marked_task(marker)
    final: dict[str, str] = {}
    release = tmp_path / "release"
    for follower in followers:  # full followers hand their submits to the leader
        fill_slots(follower, release, 2)
    poll_until(lambda: sampler.latest(leader.name, 0) is not None, 20, interval=0.1,
               message="a leader sample before the stall")
    frozen = time.monotonic()
    leader.agent.pause()
    try:
        # At once, while the followers still name the frozen leader: each forwards its
        # submit there, where the request waits unread in the socket past the timeout.
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda n: submit(n, task), [*followers, *followers]))
        task_ids = [answered_id(status, body) for status, body, _ in answers]
        release.touch()  # room for the queued tasks on the followers
        new, new_token = wait_for_leader(followers, newer_than=token, timeout=30)
        for tid in task_ids:  # dispatched by the new leader while the old one sleeps
            final[tid] = end_of(followers, tid)
        stopped = time.monotonic() - frozen
    finally:
        release.touch()
        leader.agent.resume()
    agreed, agreed_token = wait_for_leader(c.nodes, newer_than=token, timeout=30)
    fresh = drain_stale_requests(leader, task)
    final[fresh] = end_of(c.nodes, fresh)
    orphans = orphan_count(ids)
    twice = runs_twice_or_unasked(marker, final)
    sampler.stop()
    split = sampler.overlaps()
    changes = len(sampler.terms()) - 1
    timed_out = gave_up_on_leader(followers, task_ids)
    row(fault_report, "leader SIGSTOP > forward timeout",
        f"SIGSTOP {leader.name} (leader) {stopped:.0f}s > wait+peer_timeout "
        f"{SUBMIT_WAIT + PEER_TIMEOUT:g}s; {len(task_ids)} submits on followers", None,
        final, changes, len(split), orphans, 0, twice)
    print(f"  answers {brief(answers)}; forwards that timed out: {len(timed_out)}; "
          f"new leader {new.name}:{new_token}; after SIGCONT {agreed.name}:{agreed_token}")
    assert not twice, twice
    assert timed_out, "no submit's forward to the frozen leader timed out: not the scenario"
    assert set(final.values()) == {"succeeded"}, final
    assert not split, split
    assert orphans == 0


@pytest.mark.slow
def test_lost_reply_to_a_forwarded_submit_runs_the_task_once(
        fault_cluster, samplers, fault_report, tmp_path):
    c, _ = fault_cluster(3, ("--peer-timeout", str(PEER_TIMEOUT), "--max-tasks", "2"))
    ids = [n.node_id for n in c.nodes]
    sampler = samplers(c.nodes, c.net.log_dir)
    leader, _token = wait_for_leader(c.nodes)
    follower = next(n for n in c.nodes if n is not leader)
    marker = tmp_path / "starts"
    task = marked_task(marker)
    final: dict[str, str] = {}
    release = tmp_path / "release"
    fill_slots(follower, release, 2)  # so its submits go to the leader (4 slots elsewhere)
    # The follower's forwards reach the leader, which places them; its answers are lost.
    harness.drop_replies(follower.host, leader.host.ip, oxide.API_PORT)
    try:
        answers = submit_while_started(marker, [(follower, task)] * 3)
        task_ids = [answered_id(status, body) for status, body, _ in answers]
    finally:
        harness.clear_faults(follower.host)
        release.touch()
    for tid in task_ids:
        final[tid] = end_of(c.nodes, tid)
    fresh = drain_stale_requests(follower, task)
    final[fresh] = end_of(c.nodes, fresh)
    orphans = orphan_count(ids)
    twice = runs_twice_or_unasked(marker, final)
    sampler.stop()
    split = sampler.overlaps()
    changes = len(sampler.terms()) - 1
    timed_out = gave_up_on_leader([follower], task_ids)
    row(fault_report, "lost reply: leader -> follower",
        f"drop {leader.name} (leader) -> {follower.name} HTTP data; "
        f"{len(task_ids)} submits on {follower.name}", None, final, changes, len(split),
        orphans, 0, twice)
    print(f"  answers {brief(answers)}; forwards that timed out: {len(timed_out)}")
    assert not twice, twice
    assert len(timed_out) == len(task_ids), "a forward was answered: no reply was lost"
    assert set(final.values()) == {"succeeded"}, final
    assert not split, split
    assert orphans == 0


@pytest.mark.slow
def test_lost_reply_to_the_leaders_placement_runs_the_task_once(
        fault_cluster, samplers, fault_report, tmp_path):
    c, _ = fault_cluster(3, ("--peer-timeout", str(PEER_TIMEOUT), "--max-tasks", "1"))
    ids = [n.node_id for n in c.nodes]
    sampler = samplers(c.nodes, c.net.log_dir)
    leader, _token = wait_for_leader(c.nodes)
    others = [n for n in c.nodes if n is not leader]
    marker = tmp_path / "starts"
    task = marked_task(marker)
    release = tmp_path / "release"
    # The leader's one slot is taken, so it places the task on another node.
    blocker = {"command": "sh", "args": ["-c", f"while [ ! -e {release} ]; do sleep 0.05; "
                                         "done"], "node": leader.node_id}
    status, body, _ = leader.agent.post("/execute", blocker, timeout=30)
    assert status == 202 and body["state"] == "running", (status, body)
    final: dict[str, str] = {}
    # Placements reach the nodes, which start the task; their answers to the leader are lost.
    for node in others:
        harness.drop_replies(leader.host, node.host.ip, oxide.API_PORT)
    try:
        (answer,) = submit_while_started(marker, [(leader, task)])
        task_id = answered_id(*answer[:2])
    finally:
        harness.clear_faults(leader.host)
        release.touch()
    final[task_id] = end_of(c.nodes, task_id)
    assert end_of(c.nodes, body["id"]) == "succeeded"  # the blocker (no marker line)
    fresh = drain_stale_requests(leader, task)
    final[fresh] = end_of(c.nodes, fresh)
    orphans = orphan_count(ids)
    twice = runs_twice_or_unasked(marker, final)
    sampler.stop()
    split = sampler.overlaps()
    changes = len(sampler.terms()) - 1
    row(fault_report, "lost reply: node -> leader",
        f"drop {', '.join(n.name for n in others)} -> {leader.name} (leader) HTTP data; "
        f"1 submit on {leader.name} (full)", None, final, changes, len(split), orphans, 0,
        twice)
    print(f"  answer {brief([answer])}")
    assert set(final.values()) == {"succeeded"}, final
    assert not split, split
    assert orphans == 0
    assert not twice, twice


# --------------------------------------------------------------------------- the cluster queue


def queued_ids(node: OxideNode) -> list[str]:
    """``GET /queue`` on ``node``: the queued task ids in dispatch order."""
    return [task["id"] for task in node.get_json("/queue")["tasks"]]


@pytest.mark.slow
def test_leader_kill_9_with_five_queued_runs_every_queued_task_once(
        fault_cluster, samplers, fault_report, tmp_path):
    c, _ = fault_cluster(3, ("--max-tasks", "1"))
    ids = [n.node_id for n in c.nodes]
    sampler = samplers(c.nodes, c.net.log_dir)
    leader, token = wait_for_leader(c.nodes)
    follower = next(n for n in c.nodes if n is not leader)
    poll_until(lambda: sampler.latest(leader.name, 0) is not None, 20, interval=0.1,
               message="a leader sample before the kill")  # else no term shows the change
    marker = tmp_path / "starts"
    task = marked_task(marker, 3)
    with ThreadPoolExecutor(9) as pool:  # 9 tasks, 3 slots: 6 wait in the queue
        answers = list(pool.map(lambda _: follower.agent.post("/execute", task, timeout=60),
                                range(9)))
    assert [status for status, _, _ in answers] == [202] * 9, answers
    task_ids = [body["id"] for _, body, _ in answers]
    queued = poll_until(lambda: (lambda q: q if len(q) >= 5 else None)(queued_ids(follower)),
                        20, interval=0.1, message="five tasks queued")
    running = kill_with_tasks(leader)
    survivors = [n for n in c.nodes if n is not leader]
    new, new_token = wait_for_leader(survivors, newer_than=token, timeout=30)
    final = {tid: end_of(survivors, tid, timeout=120) for tid in task_ids}
    orphans = orphan_count(ids)
    twice = runs_twice_or_unasked(marker, final)
    sampler.stop()
    split = sampler.overlaps()
    changes = len(sampler.terms()) - 1
    row(fault_report, "leader kill -9, 5+ queued", f"kill -9 {leader.name} (leader) with "
        f"{len(queued)} queued on 3 x 1 slot", None, final, changes, len(split), orphans,
        len(running), twice)
    print(f"  queued at the kill {len(queued)}; running on the leader {sorted(running)}; "
          f"new leader {new.name}:{new_token}")
    assert not twice, twice
    for tid in queued:  # every queued task started on a survivor, and ended well
        assert final[tid] == "succeeded", (tid, final[tid])
    assert {s for t, s in final.items() if t in running} <= {"lost"}, final
    assert {s for t, s in final.items() if t not in running} == {"succeeded"}, final
    assert not split, split
    assert orphans == 0


@pytest.mark.slow
def test_redis_restart_with_appendonly_keeps_the_queue(fault_cluster, fault_report, tmp_path):
    c, redis = fault_cluster(3, ("--max-tasks", "1"), appendonly=True)
    ids = [n.node_id for n in c.nodes]
    leader, token = wait_for_leader(c.nodes)
    follower = next(n for n in c.nodes if n is not leader)
    survivors = [n for n in c.nodes if n is not follower]
    marker = tmp_path / "starts"
    task = marked_task(marker)
    release = tmp_path / "release"
    hold = ["-c", f"while [ ! -e {release} ]; do sleep 0.05; done"]
    blockers = {}
    try:
        for node in c.nodes:  # every slot taken: what follows waits in the queue
            status, body, _ = node.agent.post(
                "/execute", {"command": "sh", "args": hold, "node": node.node_id}, timeout=30)
            assert status == 202 and body["state"] == "running", (status, body)
            blockers[node.name] = body["id"]
        task_ids = []
        for priority in (0, 5, 0, 1):
            status, body, _ = follower.agent.post("/execute", {**task, "priority": priority},
                                                  timeout=30)
            assert status == 202 and body["state"] == "queued", (status, body)
            task_ids.append(body["id"])
        before = queued_ids(follower)
        assert sorted(before) == sorted(task_ids), before
        # The node the tasks entered by dies first: only Redis's own file holds the queue.
        killed = kill_with_tasks(follower)
        t0 = time.monotonic()
        redis.restart()
        _, token2 = wait_for_leader(survivors, newer_than=token - 1, timeout=30)

        def same_queue() -> list[str] | None:
            with contextlib.suppress(AssertionError, NodeUnreachable):
                after = [queued_ids(node) for node in survivors]
                if all(listing == before for listing in after):
                    return after[0]
            return None
        poll_until(same_queue, 30, interval=0.2,
                   message=f"both live nodes to list the queue {before} again")
        intact_after = time.monotonic() - t0
    finally:
        release.touch()
    final = {tid: end_of(survivors, tid, timeout=60) for tid in task_ids}
    for node in survivors:
        assert end_of(survivors, blockers[node.name]) == "succeeded"
    orphans = orphan_count(ids)
    twice = runs_twice_or_unasked(marker, final)
    row(fault_report, "redis restart (appendonly), queued", f"kill -9 {follower.name} (its "
        f"{len(task_ids)} tasks queued), redis restart", None, final, 0, 0, orphans,
        len(killed), twice)
    print(f"  queue {before} listed again by both live nodes {intact_after:.2f} s after the "
          f"restart; leader token {token} -> {token2}")
    assert not twice, twice
    assert set(final.values()) == {"succeeded"}, final
    assert orphans == 0


# ClusterAdmission._send waits peer_timeout for a node's /internal/dispatch answer.
DISPATCH_TIMEOUT = PEER_TIMEOUT


@pytest.mark.slow
def test_lost_reply_to_a_queued_tasks_dispatch_runs_it_once(
        fault_cluster, samplers, fault_report, tmp_path):
    c, _ = fault_cluster(3, ("--peer-timeout", str(PEER_TIMEOUT), "--max-tasks", "1"))
    ids = [n.node_id for n in c.nodes]
    sampler = samplers(c.nodes, c.net.log_dir)
    leader, _token = wait_for_leader(c.nodes)
    target = next(n for n in c.nodes if n is not leader)
    others = [n for n in c.nodes if n is not leader]
    marker = tmp_path / "starts"
    task = marked_task(marker)
    releases = {node.name: tmp_path / f"release-{node.name}" for node in c.nodes}
    blockers = {}
    final: dict[str, str] = {}
    try:
        for node in c.nodes:  # every slot taken, so the task waits in the queue
            hold = ["-c", f"while [ ! -e {releases[node.name]} ]; do sleep 0.05; done"]
            status, body, _ = node.agent.post(
                "/execute", {"command": "sh", "args": hold, "node": node.node_id}, timeout=30)
            assert status == 202 and body["state"] == "running", (status, body)
            blockers[node.name] = body["id"]
        # The leader learns of the busy slots from heartbeats: until then it may send the
        # task to a node that refuses it, which is not the lost answer this scenario means.
        poll_until(lambda: all(entry["stats"]["free_slots"] == 0
                               for entry in leader.remote().values()), 10,
                   message="the leader to see every slot taken")
        status, body, _ = target.agent.post("/execute", task, timeout=30)
        assert status == 202 and body["state"] == "queued", (status, body)
        task_id = body["id"]
        for node in others:  # the nodes' answers to the leader's dispatches are lost
            harness.drop_replies(leader.host, node.host.ip, oxide.API_PORT)
        try:
            releases[target.name].touch()  # a slot frees on target: the leader sends it there
            poll_until(lambda: task_id in marker.read_text().split(), 30, interval=0.05,
                       message=f"{task_id} to start on {target.name}")
            started = time.monotonic()
            # Past the leader's wait for that answer: it counts the node busy, tries again.
            poll_until(lambda: time.monotonic() > started + DISPATCH_TIMEOUT + 2, 30,
                       message="the dispatch to time out")
        finally:
            harness.clear_faults(leader.host)
    finally:
        for path in releases.values():
            path.touch()
    final[task_id] = end_of(c.nodes, task_id)
    for tid in blockers.values():
        assert end_of(c.nodes, tid) == "succeeded"
    fresh = drain_stale_requests(leader, task)
    final[fresh] = end_of(c.nodes, fresh)
    orphans = orphan_count(ids)
    twice = runs_twice_or_unasked(marker, final)
    sampler.stop()
    split = sampler.overlaps()
    changes = len(sampler.terms()) - 1
    row(fault_report, "lost reply: dispatch -> leader",
        f"drop {', '.join(n.name for n in others)} -> {leader.name} (leader) HTTP data "
        f"{DISPATCH_TIMEOUT + 2:g}s; 1 queued task dispatched to {target.name}", None, final,
        changes, len(split), orphans, 0, twice)
    assert not twice, twice
    assert set(final.values()) == {"succeeded"}, final
    assert not split, split
    assert orphans == 0

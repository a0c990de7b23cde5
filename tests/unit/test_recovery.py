from __future__ import annotations

import attrs
import pytest_twisted
from twisted.internet import task

from oxide_cluster.recovery import Recovery


class FakeDirectory:
    def __init__(self, records):
        self.records = {r["node_id"]: [dict(r)] for r in records}
        self.lost = []
        self.retried = []

    async def unfinished(self, node_id):
        return self.records.pop(node_id, [])

    async def record_lost(self, record):
        self.lost.append(dict(record))

    async def record_retried(self, record):
        self.retried.append(dict(record))


@attrs.define
class FakeElector:
    is_leader: bool = True


@attrs.define
class FakeNode:
    node_id: str = "leader"
    elector: FakeElector = attrs.Factory(FakeElector)
    membership: object = None


def record(node_id="b", retries=1, secret_keys=()):
    return {"id": f"t-{node_id}", "node_id": node_id, "state": "running", "retries": retries,
            "secret_env_keys": list(secret_keys), "env": {"A": "1"}, "attempt": 1}


def make(records, is_leader=True):
    retried, published = [], []

    class Router:
        async def place_retry(self, rec):
            retried.append(rec["id"])
            return {"id": "new", "node_id": "c"}

    node = FakeNode(elector=FakeElector(is_leader))
    directory = FakeDirectory(records)
    recovery = Recovery(task.Clock(), node, directory, Router(), published.append)
    return recovery, directory, retried, published


@pytest_twisted.ensureDeferred
async def test_dead_node_tasks_become_lost_and_retried():
    recovery, directory, retried, published = make([record()])
    lost = await recovery.recover_node("b")
    assert [t["state"] for t in lost] == ["lost"] and "node b died" in lost[0]["reason"]
    assert retried == ["t-b"]
    assert directory.lost[0]["state"] == "lost"
    # Recorded lost first (so a reader sees it at once), then again naming its retry.
    assert "retried_by" not in directory.lost[0]
    assert directory.retried == [{**directory.lost[0], "retried_by": "new"}]
    assert lost[0]["retried_by"] == "new"
    assert published[0]["event"] == "lost" and "env" not in published[0]["task"]


@pytest_twisted.ensureDeferred
async def test_no_retry_without_retries_or_with_secret_env():
    recovery, _, retried, _ = make([record("b", retries=0), record("c", secret_keys=["T"])])
    await recovery.recover_node("b")
    lost = await recovery.recover_node("c")
    assert retried == []
    assert "not retried" in lost[0]["reason"]
    assert "retried_by" not in lost[0]


def test_only_the_leader_acts_and_only_on_gone_events():
    recovery, directory, _, _ = make([record()], is_leader=False)
    recovery.membership_event({"type": "node", "event": "dead", "node": {"node_id": "b"}})
    assert directory.lost == []
    recovery._node.elector.is_leader = True
    recovery.membership_event({"type": "node", "event": "suspect", "node": {"node_id": "b"}})
    assert directory.lost == []
    recovery.membership_event({"type": "node", "event": "dead", "node": {"node_id": "b"}})
    assert [r["id"] for r in directory.lost] == ["t-b"]


def test_a_failed_recovery_is_tried_again_while_leading():
    recovery, directory, _, _ = make([record()])
    clock = recovery._reactor
    calls = []
    real = directory.unfinished

    async def flaky(node_id):
        calls.append(node_id)
        if len(calls) == 1:
            raise ConnectionError("redis timed out")
        return await real(node_id)
    directory.unfinished = flaky
    recovery.membership_event({"type": "node", "event": "dead", "node": {"node_id": "b"}})
    assert directory.lost == []
    clock.advance(1)
    assert calls == ["b", "b"] and [r["id"] for r in directory.lost] == ["t-b"]


def test_a_new_leader_recovers_the_peers_its_membership_has_seen_die():
    from oxide_cluster.membership import Membership
    from tests.unit.test_node import announce

    recovery, directory, _, _ = make([record("b"), record("c")])
    clock = task.Clock()
    membership = Membership(clock)
    for node_id, ip in (("b", "10.0.0.2"), ("c", "10.0.0.3")):
        membership.announce_received(node_id, announce(node_id, None), (ip, 4001))
    clock.advance(1.5)
    membership.announce_received("c", announce("c", None), ("10.0.0.3", 4001))
    clock.advance(1.5)
    membership.check()  # b silent 3 s: dead; c heard 1.5 s ago: suspect at most
    recovery._node.membership = membership
    recovery.leader_changed({"node_id": "leader"})
    assert [r["id"] for r in directory.lost] == ["t-b"]

"""``/api/cluster/nodes`` as ``Node.cluster_nodes`` builds it: the leader in one shape."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import jsonschema
from twisted.internet.task import Clock

from oxide_cluster.membership import Membership
from oxide_cluster.node import Node
from oxide_cluster.openapi import document

LEADER_SINCE = 1_700_000_000.25  # unix seconds, as the elector and the wire keep it


def announce(node_id: str, leader: dict[str, Any] | None) -> dict[str, Any]:
    return {"node_id": node_id, "hostname": f"host-{node_id}", "api_port": 4000,
            "services": ["executor"], "labels": {}, "version": "0", "started_at": 1.0,
            "stats": {"cpu_percent": 1.0, "memory_percent": 2.0, "load": [0, 0, 0],
                      "running_tasks": 0, "free_slots": 4},
            "leader": leader}


def make_node(leader_id: str | None) -> Node:
    """Node ``a`` with peers ``b`` and ``c``; ``b`` claims leadership over the wire."""
    clock = Clock()
    clock.advance(LEADER_SINCE + 5)
    members = Membership(clock)
    claim = {"node_id": "b", "token": 7, "since": LEADER_SINCE}
    members.announce_received("b", announce("b", claim), ("10.0.0.2", 4001))
    members.announce_received("c", announce("c", None), ("10.0.0.3", 4001))
    leader = {"node_id": leader_id, "token": 7 if leader_id else None,
              "since": LEADER_SINCE if leader_id else None}
    elector = SimpleNamespace(is_leader=leader_id == "a", leader=lambda: dict(leader))
    sampler = SimpleNamespace(current=SimpleNamespace(cpu_percent=1.0, memory_percent=2.0,
                                                      load=(0.0, 0.0, 0.0)))
    executor = SimpleNamespace(running_count=0, free_slots=2, capacity=lambda: None)
    return Node(config=SimpleNamespace(labels={}), node_id="a", secret="s",  # type: ignore[arg-type]
                store=None, executor=executor, sampler=sampler, elector=elector,
                reactor=clock, membership=members,
                hostname="host-a", ip_address="10.0.0.1")


def validate(body: dict[str, Any]) -> None:
    schema = {"$ref": "#/components/schemas/ClusterNodes",
              "components": document()["components"]}
    jsonschema.Draft202012Validator(schema).validate(body)


def test_the_leader_is_stated_once_and_every_node_says_only_whether_it_leads() -> None:
    body = make_node("b").cluster_nodes()
    assert body["leader"] == {"node_id": "b", "token": 7, "since": "2023-11-14T22:13:20.250Z"}
    nodes = [body["local_node"], *body["remote_nodes"]]
    assert {node["node_id"]: node["is_leader"] for node in nodes} == \
        {"a": False, "b": True, "c": False}
    assert all("leader" not in node for node in nodes)  # no second (float-since) form
    assert body["leader"] == make_node("b").leader()  # same as /api/cluster/leader
    validate(body)


def test_the_local_leader_is_flagged_like_any_other_node() -> None:
    body = make_node("a").cluster_nodes()
    assert body["local_node"]["is_leader"] is True
    assert body["leader"]["node_id"] == "a"
    assert [node["is_leader"] for node in body["remote_nodes"]] == [False, False]
    validate(body)


def test_without_a_leader_no_node_is_flagged() -> None:
    body = make_node(None).cluster_nodes()
    assert body["leader"] == {"node_id": None, "token": None, "since": None}
    nodes = [body["local_node"], *body["remote_nodes"]]
    assert not any(node["is_leader"] for node in nodes)
    validate(body)

from __future__ import annotations

from oxide_cluster.placement import Candidate, rank


def candidate(node_id, free, cpu=10.0, memory=10.0, **labels):
    return Candidate(node_id, free, cpu, memory, labels)


def test_most_free_slots_first_then_lowest_cpu():
    ranked = rank([candidate("a", 1), candidate("b", 3, cpu=90), candidate("c", 3, cpu=5)], {})
    assert [c.node_id for c in ranked] == ["c", "b", "a"]


def test_full_nodes_are_last_not_dropped():
    ranked = rank([candidate("full", 0), candidate("over", -1), candidate("free", 1)], {})
    assert [c.node_id for c in ranked] == ["free", "full", "over"]


def test_labels_must_all_match():
    nodes = [candidate("plain", 4), candidate("gpu", 1, gpu="yes", os="linux"),
             candidate("other", 4, gpu="no")]
    assert [c.node_id for c in rank(nodes, {"gpu": "yes"})] == ["gpu"]
    assert rank(nodes, {"gpu": "yes", "os": "mac"}) == []


def test_a_draining_node_is_never_chosen():
    draining = Candidate("d", 8, 1.0, 1.0, {}, draining=True)
    assert [c.node_id for c in rank([draining, candidate("busy", 0)], {})] == ["busy"]
    assert rank([draining], {}) == []

"""``python -m bench``'s cluster_queue rows on a small scale: 3 real agents and a real
redis-server, every figure computed from tasks that really ran."""

from __future__ import annotations

import shutil

import pytest

from bench import cluster_queue

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs redis-server")


def test_cluster_queue_rows_measure_a_drain_a_fair_share_and_a_deep_queue(tmp_path):
    figures = cluster_queue.run(tmp_path, tasks=60, fair=60, depth=150, probes=10,
                                clients=4, fill_budget=60.0)
    assert figures["tasks"] == 60 and figures["drain_per_s"] > 0
    assert 0 < figures["wait_p50_s"] <= figures["wait_p99_s"]
    assert figures["shallow_depth"] >= 100 and figures["deep_depth"] >= 150
    # fair share: the group of 10 is done long before the big group's 50th start
    assert figures["small_last_index"] < figures["big_50th_index"]
    rows = cluster_queue.rows(figures)
    assert len(rows) == 8 and all(row[0] == "cluster queue" for row in rows)
    assert any("150 queued" in row[1] for row in rows)

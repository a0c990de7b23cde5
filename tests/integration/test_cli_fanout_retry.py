"""``run --parallel --retries 1`` on three real agents and a real ``redis-server``: the
node running both shards is killed (-9); the CLI follows each shard into the retry the
leader places elsewhere, under the same prefix, and exits with the retries' codes."""

from __future__ import annotations

import re
import time

from tests.integration.test_cli import cli, finished
from tests.integration.test_recovery import cluster, node_id  # noqa: F401 - a fixture
from tests.support import poll_until


def test_a_shard_whose_node_dies_is_followed_into_its_retry(cluster):  # noqa: F811
    nodes, started_tasks = cluster
    leader_id = nodes[0].get("/api/cluster/leader").json()["node_id"]
    victim = next(node for node in nodes if node_id(node) != leader_id)
    victim_id = node_id(victim)
    survivor = next(node for node in nodes if node is not victim)
    # On the victim the shards wait for ever; their retries elsewhere end, shard 2 with 4.
    script = (f'if [ "$OXIDE_NODE_ID" = "{victim_id}" ]; then echo started; sleep 300; '
              'fi; echo "finished $OXIDE_SHARD_INDEX"; exit $((OXIDE_SHARD_INDEX * 4))')
    process = cli(survivor.url, "run", "--parallel", "2", "--retries", "1", "--node-id",
                  victim_id, "--", "sh", "-c", script)

    def both_running():
        assert process.poll() is None, finished(process)
        tasks = [t for t in victim.get("/tasks").json()["tasks"] if t["state"] == "running"
                 and t["output_bytes"] > 0]
        return tasks if len(tasks) == 2 else None
    first = poll_until(both_running, timeout=20, message="both shards running on the victim")
    started_tasks.extend(task["id"] for task in first)
    victim.kill()
    killed_at = time.monotonic()
    code, out, err = finished(process, timeout=60)
    print(f"\nCLI ended {time.monotonic() - killed_at:.2f}s after kill -9, both retries "
          "followed")
    assert code == 4, (out, err)
    lines = sorted(out.decode().splitlines())
    # A dead node's last output may never have been read (kill -9): "started" may be
    # missing, but each shard's retry finishes once and nothing else is printed.
    assert [line for line in lines if "finished" in line] == [
        "[1/2] finished 0", "[2/2] finished 1"], (out, err)
    assert set(lines) - {"[1/2] finished 0", "[2/2] finished 1"} <= {
        "[1/2] started", "[2/2] started"}, (out, err)
    text = err.decode()
    retries = re.findall(r"\[(\d)/2\] task (\S+) lost \(node \S+ died[^)]*\); following its "
                         r"retry, task (\S+)", text)
    assert sorted(label for label, _, _ in retries) == ["1", "2"], text
    assert {lost for _, lost, _ in retries} == {task["id"] for task in first}
    for label, lost, retry in retries:
        task = survivor.get(f"/task/{retry}").json()
        assert task["retry_of"] == lost and task["attempt"] == 2
        assert task["node_id"] != victim_id
        assert f"shard {label}/2 task {retry} (retry of lost {lost}): exit " in text, text
    assert "shard 2/2 (task" in text and "failed with exit 4" in text, text

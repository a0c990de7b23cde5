"""Collectors for layers that land from other branches: discovery, WebSocket, elector."""

from __future__ import annotations

import enum
from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.routing import Map, Rule

from oxide_cluster.metrics import NodeMetrics, route_template


class _State(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"


def fake_node(**extra):
    executor = SimpleNamespace(state_listeners=[], running_count=1, max_tasks=4, free_slots=3,
                               capacity=lambda: None)
    elector = SimpleNamespace(is_leader=False,
                              leader=lambda: {"node_id": "other", "token": "17", "since": None})
    sampler = SimpleNamespace(current=SimpleNamespace(cpu_percent=5.0, memory_percent=9.0))
    fields = {"membership": None, "retention": None, **extra}
    return SimpleNamespace(node_id="n1", hostname="h1", executor=executor, elector=elector,
                           sampler=sampler, **fields)


def scrape(node, **given) -> dict[str, dict[tuple, float]]:
    metrics = NodeMetrics(node, Map([]), **given)
    samples: dict[str, dict[tuple, float]] = {}
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


def test_discovery_counters_and_peer_states_are_exposed():
    counters = {"received": {"announce": 5, "query": 1}, "sent": {"announce": 7},
                "dropped": {"bad_mac": 2, "replay": 0}, "ignored": {"own": 3},
                "errors": {"send": 1}}
    peers = [SimpleNamespace(state=_State.ALIVE), SimpleNamespace(state=_State.ALIVE),
             SimpleNamespace(state=_State.DEAD)]
    discovery = SimpleNamespace(bound=True, counters=counters)
    node = fake_node(membership=SimpleNamespace(peers=lambda: peers))
    samples = scrape(node, discovery=discovery)
    datagrams = samples["oxide_discovery_datagrams_total"]
    assert datagrams[(("direction", "received"), ("type", "announce"))] == 5
    assert datagrams[(("direction", "sent"), ("type", "announce"))] == 7
    assert samples["oxide_discovery_dropped_total"][(("reason", "bad_mac"),)] == 2
    assert samples["oxide_discovery_events_total"][(("kind", "ignored"), ("name", "own"))] == 3
    assert samples["oxide_peers"] == {(("state", "alive"),): 2, (("state", "dead"),): 1}


def test_without_discovery_or_websocket_their_metrics_are_absent():
    samples = scrape(fake_node())
    assert not any(name.startswith(("oxide_discovery", "oxide_peers", "oxide_websocket"))
                   for name in samples)
    assert samples["oxide_leader"][()] == 0
    assert samples["oxide_leader_token"][()] == 17  # Redis tokens may arrive as text


def test_websocket_clients_are_the_hubs_count_at_scrape_time():
    hub = SimpleNamespace(client_count=4)
    assert scrape(fake_node(), websocket_hub=hub)["oxide_websocket_clients"][()] == 4


def test_route_template_keeps_label_values_few():
    url_map = Map([Rule("/task/<task_id>", methods=["GET"]), Rule("/execute", methods=["POST"])])
    assert route_template(url_map, "GET", "/task/abc123") == "/task/<task_id>"
    assert route_template(url_map, "GET", "/nope") == "unmatched"
    assert route_template(url_map, "GET", "/execute") == "unmatched"


def test_queue_wait_is_timed_at_start_once_per_task():
    from oxide_cluster.model import TaskState

    node = fake_node()
    metrics = NodeMetrics(node, Map([]))
    queued_long = SimpleNamespace(state=TaskState.RUNNING, created_at=100.0, started_at=102.5)
    at_once = SimpleNamespace(state=TaskState.RUNNING, created_at=100.0, started_at=100.002)
    for task in (queued_long, at_once):
        metrics.task_changed(task)
    # Its end times the run, not the wait again.
    metrics.task_changed(SimpleNamespace(state=TaskState.SUCCEEDED, created_at=100.0,
                                         started_at=102.5, finished_at=103.0, usage=None))
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    assert samples["oxide_queue_wait_seconds_count"][()] == 2
    assert abs(samples["oxide_queue_wait_seconds_sum"][()] - 2.502) < 1e-6
    buckets = samples["oxide_queue_wait_seconds_bucket"]
    assert buckets[(("le", "0.01"),)] == 1
    assert buckets[(("le", "1.0"),)] == 1
    assert buckets[(("le", "5.0"),)] == 2


def test_finished_tasks_usage_lands_in_histograms_by_source():
    from oxide_cluster.model import Task, TaskState

    node = fake_node()
    metrics = NodeMetrics(node, Map([]))
    for index, usage in enumerate([
            {"cpu_seconds": 1.2, "memory_peak_bytes": 3 * 2**20, "processes_peak": 2,
             "source": "cgroup"},
            {"cpu_seconds": 0.4, "memory_peak_bytes": None, "processes_peak": None,
             "source": "sampled"},
            None]):
        task = Task(id=f"t{index}", node_id="n1", command="true", args=[], cwd=None, env={},
                    secret_env_keys=[], labels={}, timeout=5.0, idle_timeout=None, retries=0,
                    state=TaskState.SUCCEEDED, created_at=1.0, started_at=1.0,
                    finished_at=2.0, usage=usage)
        metrics.task_changed(task)
    text = generate_latest(metrics.registry).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("oxide_task_cpu_seconds_sum", (("source", "cgroup"),))] == 1.2
    assert samples[("oxide_task_cpu_seconds_count", (("source", "sampled"),))] == 1
    assert samples[("oxide_task_memory_peak_bytes_count", (("source", "cgroup"),))] == 1
    assert ("oxide_task_memory_peak_bytes_count", (("source", "sampled"),)) not in samples

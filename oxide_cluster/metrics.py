"""Prometheus metrics of one node, read from the live objects at scrape time.

Each node has its own ``CollectorRegistry`` (tests run several nodes in one process, and
the global registry would mix them). Gauges are computed by a custom collector when
``/metrics`` is scraped, so the hot paths keep no extra bookkeeping; only finished tasks
(a counter and the duration histogram) and HTTP requests are counted as they happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.http import Request
from twisted.web.server import Site
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map

from oxide_cluster import __version__
from oxide_cluster.model import Task, TaskState
from oxide_cluster.retention import Retention

if TYPE_CHECKING:
    from oxide_cluster.membership import Membership
    from oxide_cluster.node import DiscoveryStatus, Elector, Node

__all__ = ["CONTENT_TYPE_LATEST", "MeteredSite", "NodeMetrics", "route_template"]

# CI commands run from well under a second to hours.
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200,
                    float("inf"))
# Queue waits: sub-second when a slot is free, up to the default queue_timeout (1 h).
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 30, 60, 300, 900, 1800, 3600)
# Task usage: CPU seconds like run times; memory peaks from 1 MiB to 64 GiB by fours.
CPU_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400, float("inf"))
MEMORY_BUCKETS = tuple(float(2 ** 20 * 4 ** n) for n in range(9)) + (float("inf"),)


def route_template(url_map: Map, method: str, path: str) -> str:
    """The route a path matched (``/task/<task_id>``), so labels stay few; else 'unmatched'."""
    try:
        rule, _ = url_map.bind("localhost").match(path, method, return_rule=True)
    except HTTPException:
        return "unmatched"
    return str(rule.rule)


class WebSocketClients(Protocol):
    """``ws.LiveHub``: the WebSocket clients connected now (a gauge)."""

    @property
    def client_count(self) -> int: ...


class MeteredSite(Site):
    """A Site that reports every finished request (its ``log`` hook runs once per request).

    The access log line is optional: formatting and writing it cost about as much as a
    tenth of a ``/bin/true`` task's time on the reactor.
    """

    displayTracebacks = False  # a client never sees the agent's stack

    def __init__(self, resource: Any, metrics: NodeMetrics, access_log: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self._metrics = metrics
        self._access_log = access_log

    def log(self, request: Request) -> None:
        if self._access_log:
            super().log(request)
        self._metrics.count_request(request)


class NodeMetrics:
    """The node's registry; ``render`` refreshes what needs the store, then formats."""

    def __init__(self, node: Node, url_map: Map,
                 requests_total: dict[tuple[str, int], int] | None = None,
                 queue_depth: Callable[[], dict[int, int]] | None = None, *,
                 discovery: DiscoveryStatus | None = None,
                 websocket_hub: WebSocketClients | None = None) -> None:
        self.node = node
        self.queue_depth = queue_depth  # queued tasks by priority
        self.discovery = discovery  # None: discovery is off
        self.websocket_hub = websocket_hub  # None: no /ws mounted
        self._url_map = url_map
        self.requests_total = requests_total if requests_total is not None else {}
        self.finished_total: dict[str, int] = {}
        self.stored_by_state: dict[str, int] = {}
        self.registry = CollectorRegistry()
        self.durations = Histogram(
            "oxide_task_duration_seconds", "Run time of finished tasks, by final state",
            ["state"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.queue_waits = Histogram(
            "oxide_queue_wait_seconds",
            "Seconds from a task's submit (queued) to its start, of tasks started here",
            buckets=WAIT_BUCKETS, registry=self.registry)
        self.cpu_seconds = Histogram(
            "oxide_task_cpu_seconds", "CPU seconds of finished tasks, by usage source",
            ["source"], buckets=CPU_BUCKETS, registry=self.registry)
        self.memory_peaks = Histogram(
            "oxide_task_memory_peak_bytes", "Peak memory of finished tasks, by usage source",
            ["source"], buckets=MEMORY_BUCKETS, registry=self.registry)
        self.registry.register(_NodeCollector(self))
        node.executor.state_listeners.append(self.task_changed)

    def task_changed(self, task: Task) -> None:
        """A state listener: time each task's wait at its start; count and time its run
        once, when it ends."""
        if task.state is TaskState.RUNNING and task.started_at is not None:
            self.queue_waits.observe(max(0.0, task.started_at - task.created_at))
            return
        if not task.state.terminal:
            return
        state = task.state.value
        self.finished_total[state] = self.finished_total.get(state, 0) + 1
        if task.started_at is not None and task.finished_at is not None:
            self.durations.labels(state).observe(max(0.0, task.finished_at - task.started_at))
        usage = task.usage or {}
        source = str(usage.get("source") or "cgroup")
        if isinstance(usage.get("cpu_seconds"), int | float):
            self.cpu_seconds.labels(source).observe(usage["cpu_seconds"])
        if isinstance(usage.get("memory_peak_bytes"), int):
            self.memory_peaks.labels(source).observe(usage["memory_peak_bytes"])

    def count_request(self, request: Request) -> None:
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        key = (route_template(self._url_map, method, path), int(request.code))
        self.requests_total[key] = self.requests_total.get(key, 0) + 1

    async def render(self) -> bytes:
        """The text exposition; the store's counts are fetched first (collect() is sync)."""
        self.stored_by_state = dict(await self.node.store.count_by_state())
        return generate_latest(self.registry)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class _NodeCollector:
    """Reads the executor, elector, discovery and WebSocket layer when scraped."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        # Names are dynamic (discovery may be absent): nothing to check at registration.
        return []

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        node = metrics.node
        executor = node.executor

        info = GaugeMetricFamily("oxide_node_info", "This node's identity (value 1)",
                                 labels=["node_id", "hostname", "version"])
        info.add_metric([node.node_id, node.hostname, __version__], 1)
        yield info

        stored = GaugeMetricFamily("oxide_tasks", "Tasks in this node's store, by state",
                                   labels=["state"])
        for state in TaskState:
            stored.add_metric([state.value], metrics.stored_by_state.get(state.value, 0))
        yield stored

        finished = CounterMetricFamily("oxide_tasks_finished",
                                       "Tasks that ended since the agent started, by state",
                                       labels=["state"])
        for state in TaskState:
            if state.terminal:
                finished.add_metric([state.value], metrics.finished_total.get(state.value, 0))
        yield finished

        yield GaugeMetricFamily("oxide_tasks_running", "Tasks running now",
                                value=executor.running_count)
        yield GaugeMetricFamily("oxide_task_slots", "Task slots (max_tasks)",
                                value=executor.max_tasks)
        yield GaugeMetricFamily("oxide_task_slots_free", "Task slots free now",
                                value=executor.free_slots)
        if metrics.queue_depth is not None:
            depth = GaugeMetricFamily("oxide_queue_depth",
                                      "Tasks queued, by priority: this node's queue, or "
                                      "with Redis the cluster's (on the leader; 0 elsewhere)",
                                      labels=["priority"])
            # Priority 0 always has a series, so an empty queue reads 0, not "no data".
            for priority, count in sorted({0: 0, **metrics.queue_depth()}.items()):
                depth.add_metric([str(priority)], count)
            yield depth

        load = node.sampler.current
        yield GaugeMetricFamily("oxide_cpu_percent", "Host CPU use sampled by the node",
                                value=load.cpu_percent)
        yield GaugeMetricFamily("oxide_memory_percent", "Host memory use sampled by the node",
                                value=load.memory_percent)

        requests = CounterMetricFamily("oxide_http_requests",
                                       "HTTP requests answered, by route and status",
                                       labels=["route", "status"])
        for (route, status), count in sorted(metrics.requests_total.items()):
            requests.add_metric([route, str(status)], count)
        yield requests

        yield from _leader_metrics(node.elector)
        yield from _retention_metrics(node.retention)
        if metrics.websocket_hub is not None:
            yield GaugeMetricFamily("oxide_websocket_clients", "WebSocket clients connected",
                                    value=metrics.websocket_hub.client_count)
        if metrics.discovery is not None:
            yield from _discovery_metrics(metrics.discovery.counters, node.membership)


def _retention_metrics(retention: Retention | None) -> Iterator[Metric]:
    if retention is None:
        return
    yield CounterMetricFamily("oxide_store_pruned_tasks",
                              "Finished tasks deleted by retention since the agent started",
                              value=retention.pruned_total)
    last = retention.last
    if last is not None:
        yield GaugeMetricFamily("oxide_store_bytes",
                                "Bytes of the task store on disk after the last prune",
                                value=last.file_bytes)
        yield GaugeMetricFamily("oxide_store_last_prune_timestamp",
                                "When the last prune pass ran", value=last.at)
        yield GaugeMetricFamily("oxide_store_last_prune_seconds",
                                "How long the last prune pass took", value=last.seconds)


def _leader_metrics(elector: Elector) -> Iterator[Metric]:
    yield GaugeMetricFamily("oxide_leader", "1 while this node is the cluster leader",
                            value=1 if elector.is_leader else 0)
    token = _number(elector.leader().get("token"))
    if token is not None:
        yield GaugeMetricFamily("oxide_leader_token",
                                "Fencing token of the leader this node knows of", value=token)


def _discovery_metrics(counters: Mapping[str, Mapping[str, int]],
                       membership: Membership | None) -> Iterator[Metric]:
    datagrams = CounterMetricFamily("oxide_discovery_datagrams",
                                    "Discovery datagrams sent and received, by type",
                                    labels=["direction", "type"])
    dropped = CounterMetricFamily("oxide_discovery_dropped",
                                  "Discovery datagrams dropped, by reason", labels=["reason"])
    other = CounterMetricFamily("oxide_discovery_events",
                                "Other discovery events (ignored datagrams, errors)",
                                labels=["kind", "name"])
    for group, values in sorted(counters.items()):
        for name, count in sorted(values.items()):
            if group in ("sent", "received"):
                datagrams.add_metric([str(group), str(name)], count)
            elif group == "dropped":
                dropped.add_metric([str(name)], count)
            else:
                other.add_metric([str(group), str(name)], count)
    yield datagrams
    yield dropped
    yield other

    if membership is not None:
        by_state: dict[str, int] = {}
        for peer in membership.peers():
            by_state[peer.state.value] = by_state.get(peer.state.value, 0) + 1
        peers = GaugeMetricFamily("oxide_peers", "Known peers, by membership state",
                                  labels=["state"])
        for state, count in sorted(by_state.items()):
            peers.add_metric([state], count)
        yield peers

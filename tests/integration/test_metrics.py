"""``GET /metrics`` on a real agent: Prometheus text that parses, with live values."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def scrape(agent) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Samples by name, then by sorted labels."""
    reply = agent.get("/metrics")
    assert reply.status == 200, reply
    assert reply.headers["Content-Type"].startswith("text/plain; version=")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def by_state(samples, name: str, state: str) -> float:
    return samples[name][(("state", state),)]


def test_metrics_count_tasks_by_state_after_real_runs(agent_factory):
    agent = agent_factory(extra_args=("--max-tasks", "3"))
    assert agent.run_task("true")["state"] == "succeeded"
    assert agent.run_task("true")["state"] == "succeeded"
    assert agent.run_task("false")["state"] == "failed"

    samples = scrape(agent)
    assert by_state(samples, "oxide_tasks", "succeeded") == 2
    assert by_state(samples, "oxide_tasks", "failed") == 1
    assert by_state(samples, "oxide_tasks", "running") == 0
    assert by_state(samples, "oxide_tasks_finished_total", "succeeded") == 2
    assert by_state(samples, "oxide_tasks_finished_total", "failed") == 1
    assert by_state(samples, "oxide_task_duration_seconds_count", "succeeded") == 2
    assert by_state(samples, "oxide_task_duration_seconds_count", "failed") == 1
    assert samples["oxide_task_slots"][()] == 3
    assert samples["oxide_task_slots_free"][()] == 3
    assert samples["oxide_tasks_running"][()] == 0
    assert samples["oxide_leader"][()] == 1
    assert samples["oxide_leader_token"][()] == 1


def test_metrics_show_a_running_task_and_its_slot(agent):
    reply = agent.post("/execute", {"command": "sleep", "args": ["30"]})
    assert reply.status in (200, 202), reply
    samples = scrape(agent)
    assert samples["oxide_tasks_running"][()] == 1
    assert by_state(samples, "oxide_tasks", "running") == 1
    assert samples["oxide_task_slots_free"][()] == samples["oxide_task_slots"][()] - 1
    assert agent.post(f"/task/{reply.json()['id']}/cancel?wait=10").status == 200


def test_metrics_count_http_requests_by_route_template_and_status(agent):
    agent.get("/task/nosuchtask")
    agent.get("/task/othermissing")
    agent.get("/stats", secret="wrong")
    agent.get("/no/such/route")
    samples = scrape(agent)["oxide_http_requests_total"]
    assert samples[(("route", "/task/<task_id>"), ("status", "404"))] == 2
    assert samples[(("route", "/stats"), ("status", "401"))] == 1
    assert samples[(("route", "unmatched"), ("status", "404"))] == 1
    assert samples[(("route", "/ready"), ("status", "200"))] >= 1


def test_metrics_require_the_secret(agent):
    assert agent.get("/metrics", secret=None).status == 401
    assert agent.get("/metrics", secret="wrong").status == 401


def test_metrics_show_queue_depth_by_priority_and_queue_waits(agent_factory):
    import time

    from tests.support import poll_until

    agent = agent_factory(extra_args=("--max-tasks", "1"))
    blocker = agent.post("/execute", {"command": "sleep", "args": ["30"]})
    assert blocker.status in (200, 202) and blocker.json()["state"] == "running", blocker
    queued = agent.post("/execute", {"command": "true", "priority": 3})
    assert queued.status == 202 and queued.json()["state"] == "queued", queued
    queued_since = time.monotonic()
    samples = scrape(agent)
    assert samples["oxide_queue_depth"] == {(("priority", "0"),): 0, (("priority", "3"),): 1}
    assert samples["oxide_queue_wait_seconds_count"][()] == 1  # the blocker started at once
    assert agent.post(f"/task/{blocker.json()['id']}/cancel?wait=10").status == 200
    waited_at_least = time.monotonic() - queued_since
    task_id = queued.json()["id"]
    poll_until(lambda: agent.get(f"/task/{task_id}").json()["state"] == "succeeded",
               timeout=15, message="the queued task to run")
    samples = scrape(agent)
    assert samples["oxide_queue_depth"] == {(("priority", "0"),): 0}
    assert samples["oxide_queue_wait_seconds_count"][()] == 2
    assert samples["oxide_queue_wait_seconds_sum"][()] >= waited_at_least

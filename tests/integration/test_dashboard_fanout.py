"""A fan-out run (``run --parallel``) on the dashboard: one row with its progress that
opens to its shards, in headless Chromium against a real node."""

from __future__ import annotations

from tests.integration.test_cli import cli, finished
from tests.integration.test_dashboard import (  # noqa: F401 - fixtures
    browser,
    chromium,
    css,
    open_dashboard,
    pytestmark,
    severe_console_errors,
    wait,
)


def test_a_fan_out_run_is_one_row_with_its_progress_that_opens_to_its_shards(
        agent_factory, browser) -> None:  # noqa: F811 - the fixture
    agent = agent_factory(extra_args=("--max-tasks", "3"))
    single = agent.run_task("true")
    code, _, err = finished(cli(agent.url, "run", "--parallel", "3", "--", "sh", "-c",
                                '[ "$OXIDE_SHARD_INDEX" != 2 ]'), timeout=60)
    assert code == 1, err
    open_dashboard(browser, agent)
    wait(browser, lambda d: len(css(d, "tr.fanout")) == 1, message="the run's row")
    row = css(browser, "tr.fanout")[0]
    assert (row.get_attribute("data-done"), row.get_attribute("data-total"),
            row.get_attribute("data-failures"), row.get_attribute("data-state")) \
        == ("3", "3", "1", "failed")
    assert "3/3 shards done, 1 failed" in row.text
    # Closed, the run hides its shards: the only task row is the single task.
    assert [r.get_attribute("data-task-id") for r in css(browser, "tr.task")] == \
        [single["id"]]
    row.click()
    wait(browser, lambda d: len(css(d, "tr.fanout-member")) == 3, message="the shards")
    states = [r.get_attribute("data-state") for r in css(browser, "tr.fanout-member")]
    assert states == ["succeeded", "succeeded", "failed"], states
    css(browser, "tr.fanout")[0].click()
    wait(browser, lambda d: not css(d, "tr.fanout-member"), message="the run closed")
    assert severe_console_errors(browser) == []

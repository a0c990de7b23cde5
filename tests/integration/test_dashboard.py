"""The /ui dashboard in headless Chromium (Selenium) against real twistd agents on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import SECRET, free_port, poll_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")

# Prints a coloured first half, waits for a file, then prints the second half: the task
# view must replay the first half and stream the second one live.
HALVES = ("printf 'start \\033[31mred\\033[0m \\033[1;32mbold green\\033[0m\\n'; "
          "for i in $(seq 1 50); do echo first-$i; done; "
          "while [ ! -e \"$1\" ]; do sleep 0.05; done; "
          "for i in $(seq 1 50); do echo second-$i; done; echo done >&2")
EXPECTED = ("start red bold green\n"
            + "".join(f"first-{i}\n" for i in range(1, 51))
            + "".join(f"second-{i}\n" for i in range(1, 51)) + "done\n")


@pytest.fixture(scope="module")
def chromium() -> Iterator:
    """One headless Chromium for the module: starting it costs about a second."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="oxide-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser(chromium) -> Iterator:
    """The shared browser on a blank page with an empty console, left blank afterwards
    (a dashboard of a stopped agent keeps reconnecting and would log into the next test)."""
    chromium.get("about:blank")
    chromium.get_log("browser")
    yield chromium
    chromium.get("about:blank")


def wait(driver, condition, timeout: float = 15.0, message: str = "the page"):
    """Poll a condition on the page with a deadline (the page updates asynchronously)."""
    return poll_until(lambda: condition(driver), timeout, 0.1, message)


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def text_of(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def visible(driver, element_id: str) -> bool:
    """Really rendered (CSS included), not just without the ``hidden`` attribute."""
    return css(driver, f"#{element_id}")[0].is_displayed()


def sign_in(driver, agent, secret: str = SECRET) -> None:
    driver.get(agent.url + "/")  # "/" redirects to /ui/
    assert driver.current_url == agent.url + "/ui/"
    wait(driver, lambda d: visible(d, "login"), message="the secret form")
    field = css(driver, "#secret")[0]
    field.clear()
    field.send_keys(secret)
    css(driver, "#login button[type=submit]")[0].click()


def open_dashboard(driver, agent) -> None:
    sign_in(driver, agent)
    wait(driver, lambda d: visible(d, "app") and css(d, "tr.node"), message="the dashboard")
    wait(driver, lambda d: text_of(d, "conn") == "live", message="the WebSocket to connect")
    assert SECRET not in driver.current_url


def severe_console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE"]


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    print(f"\ndashboard screenshot: {path}")
    return path


def test_dashboard_lists_every_node_of_a_three_node_cluster_and_the_leader(
        agent_factory, browser, tmp_path) -> None:
    ports = [free_port(socket.SOCK_DGRAM) for _ in range(3)]
    agents = []
    for index, port in enumerate(ports):
        peers = ",".join(f"127.0.0.1:{other}" for other in ports if other != port)
        # The later --discovery-port wins over the one AgentProcess picks on its own.
        agents.append(agent_factory(discovery=True, extra_args=(
            "--discovery-port", str(port), "--peers", peers,
            "--labels", f"zone=z{index},pool=ci")))
    ids = {a.get("/health").json()["node_id"] for a in agents}
    poll_until(lambda: agents[0].get("/api/cluster/nodes").json()["healthy_nodes"] == 3,
               message="node0 to see 3 healthy nodes")
    agents[0].run_task("sh", "-c", "echo hello")

    open_dashboard(browser, agents[0])
    wait(browser, lambda d: {row.get_attribute("data-node-id") for row in css(d, "tr.node")}
         == ids, message="all three nodes listed")
    leader = agents[0].get("/api/cluster/leader").json()
    badge = css(browser, "tr.node.leader .leader-badge")
    assert len(badge) == 1
    assert badge[0].text == f"leader · token {leader['token']}"
    leader_row = css(browser, "tr.node.leader")[0]
    assert leader_row.get_attribute("data-node-id") == leader["node_id"]
    assert f"token {leader['token']}" in text_of(browser, "leader")
    assert "3/3 nodes healthy" in text_of(browser, "summary")
    rows = css(browser, "tr.node")
    assert all(len(row.find_elements("css selector", ".bar .fill")) == 3 for row in rows)
    assert {"zone=z0", "zone=z1", "zone=z2"} <= {tag.text for tag in css(browser, "tr.node .tag")}
    wait(browser, lambda d: css(d, "tr.task[data-state=succeeded]"), message="the finished task")
    screenshot(browser, tmp_path, "dashboard-cluster.png")
    assert severe_console_errors(browser) == []


def test_submitted_task_appears_live_and_its_output_streams_into_the_task_view(
        agent, browser, tmp_path) -> None:
    open_dashboard(browser, agent)
    go = tmp_path / "go"
    reply = agent.post("/execute", {"command": "sh", "args": ["-c", HALVES, "sh", str(go)]})
    assert reply.status == 202, reply
    task_id = reply.json()["id"]
    # The list refreshes by itself only every 10 s: the row comes from the "task" event.
    row = wait(browser, lambda d: css(d, f"tr.task[data-task-id='{task_id}']"), timeout=5,
               message="the task row")[0]
    assert row.get_attribute("data-state") == "running"
    assert "sh -c" in row.text

    row.click()
    wait(browser, lambda d: "first-50" in text_of(d, "tv-output"), message="replayed output")
    assert "second-" not in text_of(browser, "tv-output")
    go.touch()
    wait(browser, lambda d: text_of(d, "tv-state") == "succeeded", message="the end state")
    wait(browser, lambda d: text_of(d, "tv-output") == EXPECTED, message="all output")
    # ANSI colours are rendered as classes, never shown as escape codes.
    assert css(browser, "#tv-output .fg1")[0].text == "red"
    assert css(browser, "#tv-output .fg2.b")[0].text == "bold green"
    assert css(browser, "#tv-output .stderr")[-1].text == "done"
    assert "exit 0" in text_of(browser, "tv-meta")
    assert css(browser, "#tv-cancel")[0].get_attribute("disabled") is not None
    # Auto-scroll followed the output to the bottom.
    assert browser.execute_script(
        "const p = document.getElementById('tv-output');"
        "return p.scrollHeight - p.scrollTop - p.clientHeight < 30")
    wait(browser, lambda d: css(d, f"tr.task[data-task-id='{task_id}'][data-state=succeeded]"),
         message="the row to show succeeded")
    browser.execute_script("document.getElementById('tv-output').scrollTop = 0")
    screenshot(browser, tmp_path, "dashboard-task.png")
    assert severe_console_errors(browser) == []


def test_state_filter_lists_only_tasks_in_that_state(agent, browser) -> None:
    finished = agent.run_task("true")
    running = agent.post("/execute", {"command": "sleep", "args": ["30"]}).json()
    open_dashboard(browser, agent)
    wait(browser, lambda d: len(css(d, "tr.task")) == 2, message="both tasks")
    from selenium.webdriver.support.select import Select

    Select(css(browser, "#state-filter")[0]).select_by_visible_text("running")
    wait(browser, lambda d: [r.get_attribute("data-task-id") for r in css(d, "tr.task")]
         == [running["id"]], message="only the running task")
    Select(css(browser, "#state-filter")[0]).select_by_visible_text("succeeded")
    wait(browser, lambda d: [r.get_attribute("data-task-id") for r in css(d, "tr.task")]
         == [finished["id"]], message="only the succeeded task")
    agent.post(f"/task/{running['id']}/cancel?wait=10")


def test_cancel_button_cancels_a_running_task(agent, browser) -> None:
    reply = agent.post("/execute", {"command": "sh", "args": ["-c", "echo waiting; sleep 60"]})
    task_id = reply.json()["id"]
    open_dashboard(browser, agent)
    browser.execute_script(f"location.hash = 'task={task_id}'")
    wait(browser, lambda d: "waiting" in text_of(d, "tv-output"), message="the task's output")
    assert text_of(browser, "tv-state") == "running"
    css(browser, "#tv-cancel")[0].click()
    poll_until(lambda: agent.get(f"/task/{task_id}").json()["state"] == "cancelled",
               timeout=15, message="the task to be cancelled")
    wait(browser, lambda d: text_of(d, "tv-state") == "cancelled", message="cancelled shown")
    assert css(browser, "#tv-cancel")[0].get_attribute("disabled") is not None


def test_wrong_secret_shows_a_clear_message_and_the_form_again(agent, browser, tmp_path) -> None:
    sign_in(browser, agent, secret="not-the-secret")
    wait(browser, lambda d: visible(d, "login-error"), message="the error message")
    message = text_of(browser, "login-error")
    assert "Wrong secret" in message and "401" in message
    assert not visible(browser, "app")
    assert browser.execute_script("return sessionStorage.getItem('oxide.secret')") is None

    # A secret that was right once but has been rotated: refused on the next load.
    browser.execute_script("sessionStorage.setItem('oxide.secret', 'rotated-away')")
    browser.refresh()
    wait(browser, lambda d: visible(d, "login") and visible(d, "login-error"),
         message="the form after a 401")
    assert "refused (HTTP 401)" in text_of(browser, "login-error")
    assert not visible(browser, "app")
    screenshot(browser, tmp_path, "dashboard-wrong-secret.png")


def rect(driver, element_id: str) -> dict:
    return driver.execute_script(
        f"const r = document.getElementById('{element_id}').getBoundingClientRect();"
        "return {top: r.top, bottom: r.bottom, viewport: window.innerHeight};")


def in_viewport(driver, element_id: str) -> bool:
    box = rect(driver, element_id)
    return box["top"] >= 0 and box["bottom"] <= box["viewport"]


def ticks(driver) -> int:
    """How many times the page's one-second clock has redrawn durations."""
    return int(driver.execute_script("return document.getElementById('app').dataset.ticks")
               or 0)


def seconds_shown(text: str) -> float:
    """The seconds of a short duration as the page writes it ("12.3 s")."""
    import re

    match = re.search(r"(\d+\.\d) s\b", text)
    assert match, f"no duration in {text!r}"
    return float(match.group(1))


@pytest.fixture
def pair(meshed):
    """Two agents on loopback that know each other (static peers)."""
    return meshed(2)

def test_a_remote_tasks_duration_stops_when_it_ends(pair, browser, tmp_path) -> None:
    from datetime import datetime

    a, b = pair
    b_id = b.get("/health").json()["node_id"]
    go = tmp_path / "go"
    script = 'echo started; while [ ! -e "$1" ]; do sleep 0.05; done'
    reply = a.post("/execute", {"command": "sh", "args": ["-c", script, "sh", str(go)],
                                "node": b_id})
    assert reply.status == 202, reply
    task_id = reply.json()["id"]
    assert reply.json()["node_id"] == b_id

    open_dashboard(browser, a)
    browser.execute_script(f"location.hash = 'task={task_id}'")
    wait(browser, lambda d: "started" in text_of(d, "tv-output"), message="the remote output")
    assert text_of(browser, "tv-state") == "running"
    go.touch()
    wait(browser, lambda d: text_of(d, "tv-state") == "succeeded", message="the end state")
    row = f"tr.task[data-task-id='{task_id}']"
    wait(browser, lambda d: css(d, f"{row}[data-state=succeeded]"), message="the row's end")
    wait(browser, lambda d: " s" in text_of(d, "tv-meta"), message="the view's duration")

    def shown() -> tuple[str, str]:
        return text_of(browser, "tv-meta"), css(browser, f"{row} .duration")[0].text

    first, seen_at = shown(), ticks(browser)
    # Two redraws by the page's clock (each about a second) after the first read.
    wait(browser, lambda d: ticks(d) >= seen_at + 2, message="two clock ticks")
    assert shown() == first
    task = a.get(f"/task/{task_id}").json()
    took = (datetime.fromisoformat(task["finished_at"])
            - datetime.fromisoformat(task["started_at"])).total_seconds()
    assert abs(seconds_shown(first[0]) - took) <= 0.11, (first, task)
    assert abs(seconds_shown(first[1]) - took) <= 0.11, (first, task)


def test_opening_a_task_scrolls_it_into_view(agent, browser, tmp_path) -> None:
    ids = [agent.run_task("true")["id"] for _ in range(45)]  # one at a time: no 429
    open_dashboard(browser, agent)
    wait(browser, lambda d: len(css(d, "tr.task")) == 45, message="45 task rows")
    first = css(browser, f"tr.task[data-task-id='{ids[-1]}']")[0]
    assert first.rect["y"] < 1000  # the newest row is near the top of the page
    first.click()
    wait(browser, lambda d: visible(d, "task-view") and text_of(d, "tv-state") == "succeeded",
         message="the task view")
    assert in_viewport(browser, "task-view"), rect(browser, "task-view")
    screenshot(browser, tmp_path, "dashboard-task-opened.png")

    # Scrolled away, a second click on the open task brings the view back.
    browser.execute_script("window.scrollTo(0, 0)")
    assert not in_viewport(browser, "task-view")
    css(browser, f"tr.task[data-task-id='{ids[-1]}'] .command")[0].click()
    wait(browser, lambda d: in_viewport(d, "task-view"), message="the view back in sight")


def test_failures_without_an_exit_code_show_the_state_or_signal_and_the_reason(
        agent, browser, tmp_path) -> None:
    running = agent.post("/execute", {"command": "sleep", "args": ["30"]}).json()
    cancelled = agent.post(f"/task/{running['id']}/cancel?wait=10").json()
    timed_out = agent.run_task("sleep", "30", timeout=0.3)
    assert cancelled["state"] == "cancelled" and timed_out["state"] == "timed_out"
    open_dashboard(browser, agent)
    for task in (cancelled, timed_out):
        assert task["exit_code"] is None and task["reason"], task
        cell = wait(browser, lambda d, task=task: css(
            d, f"tr.task[data-task-id='{task['id']}'] td.exit"), message="the row")[0]
        code = f"signal {task['signal']}" if task["signal"] else task["state"]
        assert cell.find_elements("css selector", ".code")[0].text == code
        assert cell.find_elements("css selector", ".reason")[0].text == task["reason"]
        assert cell.get_attribute("title") == task["reason"]
    browser.execute_script(f"location.hash = 'task={timed_out['id']}'")
    wait(browser, lambda d: timed_out["reason"] in text_of(d, "tv-meta"),
         message="the reason in the task view")
    screenshot(browser, tmp_path, "dashboard-failures.png")


def test_login_card_says_where_the_secret_is(agent, browser, tmp_path) -> None:
    browser.get(agent.url + "/ui/")
    wait(browser, lambda d: visible(d, "login"), message="the secret form")
    assert visible(browser, "secret-where")
    where = text_of(browser, "secret-where")
    for place in ("~/.oxide/secret", "--state-dir", "--secret", "OXIDE_CLUSTER_SECRET",
                  "--secret-file"):
        assert place in where, place
    screenshot(browser, tmp_path, "dashboard-login.png")


def test_queue_panel_lists_queued_tasks_in_dispatch_order_with_their_groups(
        agent_factory, browser, tmp_path) -> None:
    agent = agent_factory(extra_args=("--max-tasks", "1"))
    blocker = agent.post("/execute", {"command": "sleep", "args": ["30"]}).json()
    assert blocker["state"] == "running", blocker
    # Submitted first, dispatched second: the higher priority goes ahead.
    later = agent.post("/execute", {"command": "true", "group": "pipeline-a"}).json()
    first = agent.post("/execute", {"command": "echo", "args": ["hi"], "priority": 5,
                                    "group": "pipeline-b"}).json()
    assert later["state"] == first["state"] == "queued", (later, first)
    open_dashboard(browser, agent)

    def rows(d):
        return [(r.get_attribute("data-task-id"),
                 *(r.find_elements("css selector", f"td.{c}")[0].text
                   for c in ("position", "priority", "group")))
                for r in css(d, "tr.queued")]
    expected = [(first["id"], "1", "5", "pipeline-b"), (later["id"], "2", "0", "pipeline-a")]
    wait(browser, lambda d: rows(d) == expected, message="both queued tasks, in order")
    assert css(browser, "#queue-depth")[0].get_attribute("data-depth") == "2"
    assert text_of(browser, "queue-by-priority") == "priority 5: 1 · priority 0: 1"
    assert visible(browser, "queue-chart")
    points = css(browser, "#queue-chart polyline")[0].get_attribute("points").split()
    assert len(points) >= 2 and points[-1].endswith(",2.0"), points  # the top: depth 2
    # The waiting time counts up from each task's submit.
    wait(browser, lambda d: all(r.find_elements("css selector", "td.waiting")[0].text
                                .endswith(" s") for r in css(d, "tr.queued")),
         message="waiting times")
    screenshot(browser, tmp_path, "dashboard-queue.png")

    assert agent.post(f"/task/{blocker['id']}/cancel?wait=10").status == 200
    # Polled every 2 s: the drained queue shows within a few polls.
    wait(browser, lambda d: not css(d, "tr.queued") and visible(d, "queue-empty"),
         message="the queue to drain")
    assert css(browser, "#queue-depth")[0].get_attribute("data-depth") == "0"
    assert severe_console_errors(browser) == []

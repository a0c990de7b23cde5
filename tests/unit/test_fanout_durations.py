"""Recorded durations: the split they make, JUnit traced back to files, the routes and
the two storages."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import defer

from oxide_cluster.api import TaskApi
from oxide_cluster.split import (
    default_suite_name,
    pack_under_longest,
    report_durations,
    shard_durations,
    split_by_weight,
    updated,
    weights,
)
from oxide_cluster.suites import (
    RedisSuiteDurations,
    SuiteError,
    parse_durations,
    parse_suite_name,
)
from tests.unit.test_store import opened_store

# -- the split --------------------------------------------------------------------------


def test_history_changes_the_split_that_sizes_would_make():
    sizes = {"a.py": 900, "b.py": 800, "c.py": 100, "d.py": 50}
    by_size, basis = weights(sizes, {})
    assert basis == "size"
    assert split_by_weight(by_size, 2) == [["a.py", "d.py"], ["b.py", "c.py"]]
    # The smallest file is the slow one: it gets a shard of its own.
    history = {"a.py": 1.0, "b.py": 1.0, "c.py": 1.0, "d.py": 5.0}
    by_time, basis = weights(sizes, history)
    assert basis == "durations"
    assert split_by_weight(by_time, 2) == [["d.py"], ["a.py", "b.py", "c.py"]]


def test_when_one_file_sets_the_run_time_the_rest_are_packed_under_it_not_spread():
    # The bench's suite: one 10 s file, the rest 8 s in all. Spreading the rest over two
    # shards ends no sooner, and on a shared host's cores slows the long one.
    costs = {"long.py": 10.0, "a.py": 3.0, "b.py": 2.5, "c.py": 1.5, "d.py": 0.7,
             "e.py": 0.3}
    spread = split_by_weight(costs, 3)
    assert spread == [["long.py"], ["a.py", "d.py", "e.py"], ["b.py", "c.py"]]
    packed = pack_under_longest(costs, spread)
    assert packed == [["long.py"], ["a.py", "b.py", "c.py", "d.py"], ["e.py"]]
    assert sorted(name for part in packed for name in part) == sorted(costs)
    # What does not fit under the longest file goes on to the next shard.
    more = {**costs, "f.py": 3.0}
    assert pack_under_longest(more, split_by_weight(more, 3)) == [
        ["long.py"], ["a.py", "b.py", "c.py", "f.py"], ["d.py", "e.py"]]


def test_packing_leaves_an_even_split_and_two_shards_alone():
    even = {"a.py": 4.0, "b.py": 4.0, "c.py": 4.0, "d.py": 4.0, "e.py": 4.0, "f.py": 4.0}
    parts = split_by_weight(even, 3)
    assert pack_under_longest(even, parts) == parts  # no single file sets the run time
    two = {"long.py": 10.0, "a.py": 1.0, "b.py": 1.0}
    assert pack_under_longest(two, split_by_weight(two, 2)) == [["long.py"], ["a.py", "b.py"]]


def test_a_file_new_since_the_last_run_is_estimated_at_the_suite_s_seconds_per_byte():
    costs, basis = weights({"old.py": 100, "new.py": 300}, {"old.py": 2.0, "gone.py": 9.0})
    assert basis == "durations"
    assert costs == {"old.py": 2.0, "new.py": pytest.approx(6.0)}


def test_default_suite_name_is_the_directory_name_made_safe():
    assert default_suite_name("my project") == "my-project"
    assert default_suite_name(".hidden") == "hidden"
    assert default_suite_name("!!!") is None


# -- JUnit → seconds per file -------------------------------------------------------------

FILES = ["tests/test_a.py", "tests/test_b.py", "tests/test_c.py"]


def test_test_cases_are_traced_by_file_attribute_or_classname_module():
    report = b"""<testsuite tests="4">
      <testcase file="tests/test_a.py" classname="whatever" name="x" time="1.5"/>
      <testcase classname="tests.test_b.SomeTests" name="y" time="2.0"/>
      <testcase classname="test_b.SomeTests" name="z" time="0.5"/>
      <testcase classname="elsewhere.Tests" name="w" time="9"/>
    </testsuite>"""
    assert report_durations([report], FILES) == {"tests/test_a.py": 1.5,
                                                 "tests/test_b.py": 2.5}


def test_untraced_files_share_the_rest_of_the_shard_wall_time_by_size():
    report = b'<testsuite><testcase file="tests/test_a.py" name="x" time="1"/></testsuite>'
    sizes = {"tests/test_a.py": 10, "tests/test_b.py": 300, "tests/test_c.py": 100}
    found = shard_durations([report], FILES, sizes, wall=5.0)
    assert found == {"tests/test_a.py": 1.0, "tests/test_b.py": pytest.approx(3.0),
                     "tests/test_c.py": pytest.approx(1.0)}
    # No report at all: the whole run time by size.
    assert shard_durations([], FILES[1:], sizes, wall=4.0) == {
        "tests/test_b.py": pytest.approx(3.0), "tests/test_c.py": pytest.approx(1.0)}


def test_updated_durations_forget_files_no_longer_matched():
    assert updated({"a": 1.0, "gone": 2.0, "b": 3.0}, {"b": 4.0}, ["a", "b"]) == \
        {"a": 1.0, "b": 4.0}


# -- what the routes accept ---------------------------------------------------------------


@pytest.mark.parametrize("body", [
    [], {"durations": {"a": 1}, "extra": 1}, {"durations": []},
    {"durations": {"/abs.py": 1}}, {"durations": {"../up.py": 1}},
    {"durations": {"a.py": -1}}, {"durations": {"a.py": True}},
    {"durations": {"a.py": "1"}}, {"durations": {"x" * 1025: 1}},
    {"durations": {f"f{i}": 1 for i in range(20_001)}},
])
def test_bad_durations_are_refused(body):
    with pytest.raises(SuiteError):
        parse_durations(body)


@pytest.mark.parametrize("name", ["", ".x", "a/b", "a b", "x" * 129])
def test_bad_suite_names_are_refused(name):
    with pytest.raises(SuiteError):
        parse_suite_name(name)


class MemorySuites:
    def __init__(self) -> None:
        self.kept: dict[str, dict[str, float]] = {}

    def get(self, suite: str) -> defer.Deferred[dict[str, float] | None]:
        return defer.succeed(self.kept.get(suite))

    def put(self, suite: str, durations: dict[str, float]) -> defer.Deferred[None]:
        self.kept[suite] = durations
        return defer.succeed(None)


def _call(client: StubTreq, method: str, path: str, body: Any = None,
          secret: str = "s3cret") -> tuple[int, Any]:
    replies: list = []
    data = None if body is None else json.dumps(body).encode()
    client.request(method, "http://node" + path, data=data,
                   headers={"X-Cluster-Secret": secret,
                            "Content-Type": "application/json"}).addBoth(replies.append)
    client.flush()
    bodies: list = []
    replies[0].content().addBoth(bodies.append)
    client.flush()
    return replies[0].code, json.loads(bodies[0])


def test_durations_routes_store_read_refuse_and_need_the_secret():
    node = SimpleNamespace(secret="s3cret", executor=SimpleNamespace(state_listeners=[]),
                           config=SimpleNamespace(max_timeout=600.0, max_body=1 << 20))
    suites = MemorySuites()
    client = StubTreq(TaskApi(node, suites=suites).resource())  # type: ignore[arg-type]

    assert _call(client, "GET", "/suites/proj/durations") == \
        (200, {"suite": "proj", "recorded": False, "durations": {}})
    code, body = _call(client, "PUT", "/suites/proj/durations",
                       {"durations": {"tests/a.py": 1.5}})
    assert code == 200 and suites.kept == {"proj": {"tests/a.py": 1.5}}
    assert _call(client, "GET", "/suites/proj/durations") == \
        (200, {"suite": "proj", "recorded": True, "durations": {"tests/a.py": 1.5}})
    code, body = _call(client, "PUT", "/suites/proj/durations", {"durations": {"/x": 1}})
    assert code == 400 and body["error"]["code"] == "bad_request"
    code, body = _call(client, "GET", "/suites/.bad/durations")
    assert code == 400 and body["error"]["code"] == "bad_suite"
    assert _call(client, "GET", "/suites/proj/durations", secret="wrong")[0] == 401
    assert suites.kept == {"proj": {"tests/a.py": 1.5}}


# -- the storages -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_store_keeps_durations_across_a_reopen(tmp_path):
    store = await opened_store(tmp_path / "s.sqlite3")
    try:
        assert await store.get_suite_durations("proj") is None
        await store.put_suite_durations("proj", {"a.py": 1.25})
    finally:
        await store.stopService()
    store = await opened_store(tmp_path / "s.sqlite3")
    try:
        assert await store.get_suite_durations("proj") == {"a.py": 1.25}
    finally:
        await store.stopService()


class DictRedis:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.commands: list[tuple[Any, ...]] = []

    def command(self, *command: Any) -> defer.Deferred[Any]:
        self.commands.append(command)
        if command[0] == "GET":
            return defer.succeed(self.data.get(command[1]))
        self.data[command[1]] = command[2]
        return defer.succeed("OK")


def test_redis_keeps_durations_under_the_cluster_s_key_with_an_expiry():
    redis = DictRedis()
    suites = RedisSuiteDurations(redis, "c1")
    assert suites.get("proj").result is None  # type: ignore[attr-defined]
    suites.put("proj", {"a.py": 2.0})
    assert redis.commands[-1][:2] == ("SET", "oxide:c1:suite:proj:durations")
    assert redis.commands[-1][3] == "EX"
    assert suites.get("proj").result == {"a.py": 2.0}  # type: ignore[attr-defined]

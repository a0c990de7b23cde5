from __future__ import annotations

import json

from twisted.internet import defer

from oxide_cluster.directory import TaskDirectory
from oxide_cluster.model import Task, TaskState


class FakeRedis:
    """Answers each command when the test says so."""

    def __init__(self):
        self.sent = []

    def command(self, *args):
        reply = defer.Deferred()
        self.sent.append((args, reply))
        return reply


def make_task(state=TaskState.RUNNING):
    return Task(id="t1", node_id="n1", command="ls", args=[], cwd=None, env={"A": "1"},
                secret_env_keys=["S"], labels={}, timeout=5.0, idle_timeout=None, retries=1,
                state=state)


def test_api_waits_for_the_start_to_reach_redis():
    redis = FakeRedis()
    directory = TaskDirectory(redis, "c")
    directory.task_changed(make_task())
    (args, reply), = redis.sent
    assert args[:3] == ("HSET", "oxide:c:active:n1", "t1")
    record = json.loads(args[3])
    assert record["env"] == {"A": "1"} and record["secret_env_keys"] == ["S"]
    waiting = directory.recorded("t1")
    assert not waiting.called
    reply.callback(1)
    assert waiting.called
    assert directory.recorded("t1").called  # settled: nothing left to wait for


def test_a_failed_write_is_counted_and_does_not_block():
    redis = FakeRedis()
    directory = TaskDirectory(redis, "c")
    directory.task_changed(make_task())
    waiting = directory.recorded("t1")
    redis.sent[0][1].errback(ConnectionError("redis away"))
    assert waiting.called and directory.errors == 1


def test_finished_task_is_removed():
    redis = FakeRedis()
    TaskDirectory(redis, "c").task_changed(make_task(TaskState.SUCCEEDED))
    assert redis.sent[0][0] == ("HDEL", "oxide:c:active:n1", "t1")
    redis.sent[0][1].callback(1)

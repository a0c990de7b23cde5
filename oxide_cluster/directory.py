"""The cluster's record of unfinished tasks per node, in Redis, for the leader's recovery.

A task's record lives on its owner; when the owner dies, nobody else could say which of
its tasks were unfinished. So every node also keeps, in Redis, one hash per node of its
unfinished tasks (``HSET`` at start, ``HDEL`` at the end: two small writes per task, off
the request path). When membership declares a node dead (or restarted), the leader reads
that hash, records each task ``lost`` under ``oxide:{cluster}:lost:{id}`` (so any node can
answer for it while the owner is down) and re-places those that have retries left.

Only the request fields needed to run the task again are kept, never ``secret_env``
values: a task with ``secret_env`` is not retried elsewhere (its reason says why).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from oxide_cluster.model import Task, TaskState
from oxide_cluster.redis_connection import RedisCommands

LOST_TTL = 7 * 24 * 3600


def retry_record(task: Task) -> dict[str, Any]:
    """The task as the directory keeps it: its JSON plus what a retry needs."""
    record = task.to_json()
    record.update(env=task.env, secret_env_keys=task.secret_env_keys)
    return record


class TaskDirectory:
    """Unfinished tasks by node and lost tasks by id, over one Redis connection (a
    service of its own: it opens at start-up and closes after everything that uses it)."""

    log = Logger()

    def __init__(self, redis: RedisCommands, cluster: str) -> None:
        self._redis = redis
        self._prefix = f"oxide:{cluster}"
        self.errors = 0
        self._starting: dict[str, defer.Deferred[Any]] = {}

    def _active(self, node_id: str) -> str:
        return f"{self._prefix}:active:{node_id}"

    def _lost(self, task_id: str) -> str:
        return f"{self._prefix}:lost:{task_id}"

    def _best_effort(self, reply: defer.Deferred[Any], what: str) -> defer.Deferred[Any]:
        def failed(failure: Failure) -> None:
            self.errors += 1
            self.log.warn("task directory: {what} failed: {error}", what=what,
                          error=failure.getErrorMessage())
        return reply.addErrback(failed)

    def task_changed(self, task: Task) -> None:
        """Executor state listener: track the task while it runs."""
        if task.state is TaskState.RUNNING:
            written = self._best_effort(self._redis.command(
                "HSET", self._active(task.node_id), task.id,
                json.dumps(retry_record(task), separators=(",", ":"))), "HSET")
            self._starting[task.id] = written

            def settled(_: object) -> None:
                # Returns None: returning the popped Deferred would chain it to itself.
                del self._starting[task.id]
            written.addBoth(settled)
        elif task.state.terminal:
            self._best_effort(self._redis.command(
                "HDEL", self._active(task.node_id), task.id), "HDEL")

    def recorded(self, task_id: str) -> defer.Deferred[Any]:
        """Fires once the task's start is in Redis (or that write failed): the API answers
        202 only then, so a node killed right after still leaves its task to recover."""
        pending = self._starting.get(task_id)
        if pending is None:
            return defer.succeed(None)
        waiter: defer.Deferred[Any] = defer.Deferred()

        def wake(result: Any) -> Any:
            waiter.callback(None)
            return result
        pending.addBoth(wake)
        return waiter

    async def unfinished(self, node_id: str) -> list[dict[str, Any]]:
        flat = await self._redis.command("HGETALL", self._active(node_id))
        # txredisapi answers HGETALL with a dict; a raw reply is a flat key/value list.
        values = list(flat.values()) if isinstance(flat, dict) else list(flat or [])[1::2]
        return [json.loads(value) for value in values]

    async def record_lost(self, record: dict[str, Any]) -> None:
        await self._redis.command("SET", self._lost(record["id"]),
                                  json.dumps(record, separators=(",", ":")), "EX", LOST_TTL)
        await self._redis.command("HDEL", self._active(record["node_id"]), record["id"])

    async def record_retried(self, record: dict[str, Any]) -> None:
        """The lost record again, now naming its retry (``retried_by``)."""
        await self._redis.command("SET", self._lost(record["id"]),
                                  json.dumps(record, separators=(",", ":")), "EX", LOST_TTL)

    async def lost(self, task_id: str) -> dict[str, Any] | None:
        value = await self._redis.command("GET", self._lost(task_id))
        return None if value is None else json.loads(value)

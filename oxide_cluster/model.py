"""Tasks as data: states, the task record, and the one parser of task requests."""

from __future__ import annotations

import enum
import math
import os
import re
import secrets
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import attrs

from oxide_cluster.cgroups import ResourceError, Resources, parse_resources
from oxide_cluster.gitsource import SourceError, check_source
from oxide_cluster.manifest import ManifestError, check_glob, check_relative_path, is_digest


class TaskState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    LOST = "lost"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        return self not in (TaskState.QUEUED, TaskState.RUNNING)


TERMINAL_STATES = frozenset(state for state in TaskState if state.terminal)


def new_task_id(now: float, node_id: str) -> str:
    """``<ms><random>-<node id>``: sorts by creation, and names the node that owns it.

    Any node can route a request for a task to its owner from the id alone, without a
    shared directory: the owner's address comes from the membership table.
    """
    return f"{int(now * 1000):012x}{secrets.token_hex(6)}-{node_id}"


def owner_of(task_id: str) -> str | None:
    """The node id inside a task id, or None for an id without one."""
    _, sep, owner = task_id.partition("-")
    return owner if sep and owner else None


def rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@attrs.define
class Task:
    """The durable record of one task; ``secret_env`` values are never part of it."""

    id: str
    node_id: str
    command: str
    args: list[str]
    cwd: str | None
    env: dict[str, str]
    secret_env_keys: list[str]
    labels: dict[str, str]
    timeout: float
    idle_timeout: float | None
    retries: int
    state: TaskState = TaskState.QUEUED
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    attempt: int = 1
    retry_of: str | None = None
    workspace: str | None = None
    artifacts: list[str] | None = None
    source: dict[str, str] | None = None
    output_bytes: int = 0
    output_dropped: int = 0
    pid: int | None = None
    tty: bool = False
    priority: int = 0
    group: str | None = None
    queue_timeout: float | None = None
    idempotency_key: str | None = None
    # Order of admission to the queue (FIFO within a group, kept across restarts).
    queue_seq: int | None = None
    # Declared limits in force (``Resources.to_json``), None for none.
    resources: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    oom_killed: bool = False
    # Part of a fan-out run (``run --parallel``): {"run", "index", "total", "mode"}.
    fanout: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The contract shape of a task in every response and stream."""
        return {
            "id": self.id,
            "node_id": self.node_id,
            "state": self.state.value,
            "command": self.command,
            "args": self.args,
            "cwd": self.cwd,
            "labels": self.labels,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "reason": self.reason,
            "created_at": rfc3339(self.created_at),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at),
            "attempt": self.attempt,
            "retry_of": self.retry_of,
            "workspace": self.workspace,
            "artifacts": self.artifacts,
            "source": self.source,
            "output_bytes": self.output_bytes,
            "output_dropped": self.output_dropped,
            "timeout": self.timeout,
            "idle_timeout": self.idle_timeout,
            "retries": self.retries,
            "tty": self.tty,
            "priority": self.priority,
            "group": self.group,
            "queue_position": None,
            "resources": self.resources,
            "usage": self.usage,
            "oom_killed": self.oom_killed,
            "fanout": self.fanout,
        }


class RequestError(ValueError):
    """A task request is malformed; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@attrs.frozen
class TaskRequest:
    """A validated ``POST /execute`` body."""

    command: str
    args: tuple[str, ...] = ()
    cwd: str | None = None
    env: Mapping[str, str] = attrs.field(factory=dict)
    secret_env: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    timeout: float | None = None
    idle_timeout: float | None = None
    labels: Mapping[str, str] = attrs.field(factory=dict)
    node: str | None = None
    retries: int = 0
    tty: bool = False
    workspace: str | None = None
    artifacts: tuple[str, ...] = ()
    source: Mapping[str, str] | None = None
    priority: int = 0
    group: str | None = None
    queue_timeout: float | None = None
    queue: bool = True
    resources: Resources | None = None
    fanout: Mapping[str, Any] | None = None


_FIELDS = {
    "command", "args", "cwd", "env", "secret_env", "timeout", "idle_timeout",
    "labels", "node", "retries", "tty", "priority", "group", "queue_timeout", "queue",
    "resources", "fanout",
} | {"workspace", "artifacts", "source"}
_MAX_TEXT = 64 * 1024
MAX_PRIORITY = 1_000_000
MAX_GROUP = 256
# A queued task waits at most a week, whatever the node's default says.
MAX_QUEUE_TIMEOUT = 7 * 86400.0


def _string(field: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RequestError(field, "must be a string")
    if not allow_empty and not value:
        raise RequestError(field, "must not be empty")
    if "\x00" in value:
        raise RequestError(field, "must not contain NUL bytes")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can carry lone surrogates (\ud800); argv, environ and SQLite cannot.
        raise RequestError(field, "must be valid Unicode (no lone surrogates)") from None
    if len(value) > _MAX_TEXT:
        raise RequestError(field, f"must be at most {_MAX_TEXT} characters")
    return value


def _string_map(field: str, value: Any, env_names: bool = False) -> dict[str, str]:
    if not isinstance(value, dict):
        raise RequestError(field, "must be an object of string values")
    result = {}
    for key, item in value.items():
        _string(f"{field}.{key}", key)
        if env_names and "=" in key:
            raise RequestError(f"{field}.{key}", "environment names cannot contain '='")
        result[key] = _string(f"{field}.{key}", item, allow_empty=True)
    return result


def _seconds(field: str, value: Any, maximum: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(field, "must be a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise RequestError(field, "must be a positive number of seconds")
    if value > maximum:
        raise RequestError(field, f"must be at most {maximum:g} seconds")
    return float(value)


def parse_task_request(body: Any, max_timeout: float) -> TaskRequest:
    """Validate a decoded JSON body; raise RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise RequestError(unknown[0], "unknown field")
    if "command" not in body:
        raise RequestError("command", "is required")
    command = _string("command", body["command"])
    args = body.get("args", [])
    if not isinstance(args, list):
        raise RequestError("args", "must be a list of strings")
    checked_args = tuple(_string(f"args[{i}]", a, allow_empty=True) for i, a in enumerate(args))
    workspace, artifacts = _workspace_fields(body)
    source = None
    if body.get("source") is not None:
        try:
            source = check_source(body["source"])
        except SourceError as error:
            raise RequestError("source", str(error)) from None
    cwd = body.get("cwd")
    if cwd is not None:
        cwd = _string("cwd", cwd)
        if (workspace or source) is not None and cwd.rstrip("/") in ("", "."):
            cwd = None  # the workspace root itself
        elif (workspace or source) is not None:
            try:
                check_relative_path(cwd, "cwd")
            except ManifestError as error:
                raise RequestError("cwd", f"with a workspace, must be relative to it: "
                                          f"{error}") from None
        elif not os.path.isabs(cwd):
            raise RequestError("cwd", "must be an absolute path")
    env = _string_map("env", body.get("env", {}), env_names=True)
    secret_env = _string_map("secret_env", body.get("secret_env", {}), env_names=True)
    overlap = sorted(set(env) & set(secret_env))
    if overlap:
        raise RequestError(f"secret_env.{overlap[0]}", "is also given in env")
    retries = body.get("retries", 0)
    if isinstance(retries, float) and retries.is_integer():
        retries = int(retries)  # JSON has one number type: 3.0 is the integer 3
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
        raise RequestError("retries", "must be a whole number from 0 to 10")
    node = body.get("node")
    if node is not None:
        node = _string("node", node)
    tty = body.get("tty", False)
    if not isinstance(tty, bool):
        raise RequestError("tty", "must be true or false")
    priority = body.get("priority", 0)
    if isinstance(priority, float) and priority.is_integer():
        priority = int(priority)
    if isinstance(priority, bool) or not isinstance(priority, int) \
            or not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise RequestError("priority",
                           f"must be a whole number from {-MAX_PRIORITY} to {MAX_PRIORITY}")
    group = body.get("group")
    if group is not None:
        group = _string("group", group)
        if len(group) > MAX_GROUP:
            raise RequestError("group", f"must be at most {MAX_GROUP} characters")
    queue = body.get("queue", True)
    if not isinstance(queue, bool):
        raise RequestError("queue", "must be true or false")
    resources = None
    if body.get("resources") is not None:
        try:
            resources = parse_resources(body["resources"])
        except ResourceError as error:
            raise RequestError(error.field, error.message) from None
    fanout = None if body.get("fanout") is None else parse_fanout(body["fanout"])
    return TaskRequest(
        command=command,
        args=checked_args,
        cwd=cwd,
        env=env,
        secret_env=secret_env,
        timeout=_seconds("timeout", body.get("timeout"), max_timeout),
        idle_timeout=_seconds("idle_timeout", body.get("idle_timeout"), max_timeout),
        labels=_string_map("labels", body.get("labels", {})),
        node=node,
        retries=retries,
        tty=tty,
        workspace=workspace,
        artifacts=artifacts,
        source=source,
        priority=priority,
        group=group,
        queue_timeout=_seconds("queue_timeout", body.get("queue_timeout"), MAX_QUEUE_TIMEOUT),
        queue=queue,
        resources=resources,
        fanout=fanout,
    )


FANOUT_RUN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_FANOUT = 100_000
FANOUT_MODES = ("shards", "queue")


def parse_fanout(value: Any) -> dict[str, Any]:
    """``fanout``: which run of ``run --parallel`` the task belongs to, and its place in
    it (shard ``index`` of ``total``; with ``mode`` ``queue``, batch ``index`` taken by
    one of ``total`` workers). The dashboard folds a run's tasks into one row."""
    if not isinstance(value, dict) or set(value) != {"run", "index", "total", "mode"}:
        raise RequestError("fanout", "must be an object with run, index, total and mode")
    run, index, total, mode = value["run"], value["index"], value["total"], value["mode"]
    if not isinstance(run, str) or not FANOUT_RUN.fullmatch(run):
        raise RequestError("fanout.run", "must be 1 to 64 of A-Z a-z 0-9 . _ -")
    for name, number, low in (("index", index, 0), ("total", total, 1)):
        if isinstance(number, bool) or not isinstance(number, int) \
                or not low <= number <= MAX_FANOUT:
            raise RequestError(f"fanout.{name}",
                               f"must be a whole number from {low} to {MAX_FANOUT}")
    if mode not in FANOUT_MODES:
        raise RequestError("fanout.mode", "must be 'shards' or 'queue'")
    return {"run": run, "index": index, "total": total, "mode": mode}


def _workspace_fields(body: dict[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    """``workspace`` (a manifest digest) and ``artifacts`` (globs inside the task dir)."""
    workspace = body.get("workspace")
    if workspace is not None and not is_digest(workspace):
        raise RequestError("workspace", "must be a manifest digest (64 lowercase hex "
                                        "characters, SHA-256)")
    if workspace is not None and body.get("source") is not None:
        raise RequestError("source", "give a workspace or a source, not both")
    globs = body.get("artifacts", [])
    if not isinstance(globs, list) or len(globs) > 100:
        raise RequestError("artifacts", "must be a list of at most 100 globs")
    for index, pattern in enumerate(globs):
        try:
            check_glob(pattern)
        except ManifestError as error:
            raise RequestError(f"artifacts[{index}]", str(error)) from None
    if globs and workspace is None and body.get("source") is None:
        raise RequestError("artifacts", "needs a workspace: artifacts are collected from "
                                        "the task's own directory")
    return workspace, tuple(globs)

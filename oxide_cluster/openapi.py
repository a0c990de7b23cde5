"""The OpenAPI 3 description of the HTTP API, served at ``GET /openapi.json``.

Kept as a Python dict next to the routes so one module owns it; a unit test compares its
paths and methods with the Klein ``url_map``, and a schemathesis run against a live node
checks every answer against it, so it cannot drift from what the agent really does.
"""

from __future__ import annotations

import copy
from typing import Any

from oxide_cluster import __version__
from oxide_cluster.model import MAX_GROUP, MAX_PRIORITY, MAX_QUEUE_TIMEOUT, TaskState

_REF = "#/components/schemas/"
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_STRING_OR_NULL = {"type": ["string", "null"]}
_TIME = {"type": ["string", "null"], "format": "date-time"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# What model.parse_task_request accepts: no NUL anywhere, at most 64 KiB of text.
_TEXT = {"type": "string", "pattern": "^[^\u0000]*$", "maxLength": 65536}
_NAME = {**_TEXT, "minLength": 1}
_TEXT_MAP = {"type": "object", "propertyNames": _NAME, "additionalProperties": _TEXT}
_ENV_MAP = {"type": "object", "propertyNames": {**_NAME, "pattern": "^[^=\u0000]+$"},
            "additionalProperties": _TEXT}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any], description: str,
          headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    headers = {"Retry-After": {"schema": {"type": "string"},
                               "description": "seconds to wait before trying again"}}
    return _json(_ref("Error"), description, headers if retry_after else None)


_UNAUTHORIZED = _error("missing or wrong cluster secret")
_BAD_QUERY = _error("a query parameter is malformed (`bad_query`)")
_NOT_FOUND = _error("no such task on this node, nor on a node known to own it")
_UNAVAILABLE = _error("the node owning the task is known but not reachable, or "
                      "`queue_unavailable`: the cluster queue (Redis) failed",
                      retry_after=True)

_WAIT = {"name": "wait", "in": "query", "required": False,
         "description": "long-poll: seconds to wait for the task to end (or output to arrive)",
         "schema": {"type": "number", "minimum": 0, "maximum": 300}}
_DIGEST = {"name": "digest", "in": "path", "required": True,
           "description": "SHA-256 of the blob, 64 lowercase hex characters",
           "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}
_TASK_ID = {"name": "task_id", "in": "path", "required": True,
            "description": "`<time><random>-<node id>`: names the node that owns the task",
            "schema": {"type": "string", "minLength": 1}}


def _secured(operation: dict[str, Any]) -> dict[str, Any]:
    """Every operation but the documented public ones needs the cluster secret."""
    operation.setdefault("security", [{"clusterSecret": []}, {"bearer": []}])
    operation["responses"].setdefault("401", _UNAUTHORIZED)
    return operation


_NODE_STATS = {
    "type": "object",
    "required": ["cpu_percent", "memory_percent", "load", "running_tasks", "free_slots"],
    "properties": {
        "cpu_percent": _NUMBER_OR_NULL,
        "memory_percent": _NUMBER_OR_NULL,
        "load": {"type": ["array", "null"], "items": {"type": "number"}},
        "running_tasks": {"type": "integer", "minimum": 0},
        "free_slots": {"type": "integer", "minimum": 0},
        "draining": {"type": "boolean",
                     "description": "the node takes no new tasks (POST /node/drain)"},
        "allocatable_cpus": {"type": "number", "minimum": 0,
                             "description": "CPUs tasks may declare in all (host less "
                                            "`reserve`)"},
        "allocatable_memory": {"type": "integer", "minimum": 0,
                               "description": "bytes of memory tasks may declare in all"},
        "free_cpus": {"type": "number", "minimum": 0,
                      "description": "allocatable CPUs not declared by running tasks"},
        "free_memory": {"type": "integer", "minimum": 0,
                        "description": "allocatable bytes not declared by running tasks"},
    },
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["code", "message"], "additionalProperties": False,
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }},
    },
    "TaskRequest": {
        "type": "object",
        "required": ["command"],
        "additionalProperties": False,
        "properties": {
            "command": {**_NAME, "description": "run without a shell, found on PATH"},
            "args": {"type": "array", "items": _TEXT},
            "cwd": {"type": ["string", "null"], "pattern": "^/[^\u0000]*$",
                    "maxLength": 65536, "description": "absolute path"},
            "env": _ENV_MAP,
            "secret_env": {**_ENV_MAP, "description": "passed to the process, never in any "
                           "response, log or stream; names must not also be in env"},
            "timeout": {"type": ["number", "null"], "exclusiveMinimum": 0,
                        "description": "seconds, at most the node's max_timeout"},
            "idle_timeout": {"type": ["number", "null"], "exclusiveMinimum": 0,
                             "description": "seconds without output, at most max_timeout"},
            "labels": _TEXT_MAP,
            "node": {"type": ["string", "null"], "minLength": 1, "pattern": "^[^\u0000]*$",
                     "maxLength": 65536, "description": "pin to this node id"},
            "retries": {"type": "integer", "minimum": 0, "maximum": 10},
            "tty": {"type": "boolean", "default": False,
                    "description": "run on a pseudo-terminal: the task sees a terminal "
                    "(colours, line buffering); stdout and stderr arrive as one stream, "
                    "recorded as stdout, with CRLF line ends"},
            "workspace": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$",
                          "description": "manifest digest (see /cas): the task runs in a "
                          "fresh directory built from it; cwd is then relative to it"},
            "artifacts": {"type": "array", "maxItems": 100, "items": {**_NAME},
                          "description": "globs relative to the task directory (needs "
                          "workspace or source); matching files are kept after the task "
                          "ends"},
            "source": {"type": ["object", "null"], "additionalProperties": False,
                       "required": ["git", "ref"],
                       "properties": {
                           "git": {"type": "string", "description": "https://, ssh://, "
                                   "git:// or user@host:path URL, or an absolute path "
                                   "(no ext:: or other transport helpers)"},
                           "ref": {"type": "string", "maxLength": 256,
                                   "pattern": "^[^-\\s]",
                                   "description": "branch, tag or commit"}},
                       "description": "instead of workspace: the task runs in a clone "
                       "of the repository at ref, made through the node's mirror of it "
                       "(cloned once, fetched after); git's message fails the task"},
            "priority": {"type": "integer", "minimum": -MAX_PRIORITY, "maximum": MAX_PRIORITY,
                         "description": "higher starts first; default 0"},
            "group": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_GROUP,
                      "pattern": "^[^\u0000]*$",
                      "description": "fair-share group: groups of one priority take turns; "
                                     "default: the X-Oxide-Group header, else the client's "
                                     "address"},
            "queue_timeout": {"type": ["number", "null"], "exclusiveMinimum": 0,
                              "maximum": MAX_QUEUE_TIMEOUT,
                              "description": "seconds the task may wait in the queue before "
                                             "it ends rejected; default: the node's "
                                             "queue_timeout"},
            "queue": {"type": "boolean",
                      "description": "false: refuse with 429 when no slot is free instead "
                                     "of queueing (default true)"},
            "resources": {"anyOf": [_ref("Resources"), {"type": "null"}]},
            "fanout": {"anyOf": [_ref("Fanout"), {"type": "null"}]},
        },
    },
    "Task": {
        "type": "object",
        "description": "The task JSON contract; never holds env values of secret_env.",
        "required": ["id", "node_id", "state", "command", "args", "cwd", "labels",
                     "exit_code", "signal", "reason", "created_at", "started_at",
                     "finished_at", "attempt", "retry_of", "output_bytes"],
        "properties": {
            "id": {"type": "string"},
            "node_id": {"type": "string"},
            "state": {"type": "string", "enum": [state.value for state in TaskState]},
            "command": {"type": "string"},
            "args": {"type": "array", "items": {"type": "string"}},
            "cwd": _STRING_OR_NULL,
            "labels": _STRING_MAP,
            "exit_code": {"type": ["integer", "null"]},
            "signal": {"type": ["integer", "null"]},
            "reason": _STRING_OR_NULL,
            "created_at": _TIME,
            "started_at": _TIME,
            "finished_at": _TIME,
            "attempt": {"type": "integer", "minimum": 1},
            "retry_of": _STRING_OR_NULL,
            "retried_by": {"type": "string",
                           "description": "on the leader's record of a lost task (while "
                                          "its node is down): the id of its retry, once "
                                          "placed"},
            "output_bytes": {"type": "integer", "minimum": 0},
            "output_dropped": {"type": "integer", "minimum": 0},
            "workspace": {"type": ["string", "null"]},
            "artifacts": {"type": ["array", "null"], "items": {"type": "string"}},
            "timeout": _NUMBER_OR_NULL,
            "idle_timeout": _NUMBER_OR_NULL,
            "retries": {"type": "integer", "minimum": 0},
            "tty": {"type": "boolean"},
            "priority": {"type": "integer"},
            "group": _STRING_OR_NULL,
            "queue_position": {"type": ["integer", "null"], "minimum": 1,
                               "description": "1-based place in dispatch order while queued"},
            "resources": {"type": ["object", "null"],
                          "description": "limits in force (request over the node's "
                                         "default_resources); memory in bytes",
                          "properties": {"cpus": {"type": "number"},
                                         "memory": {"type": "integer"},
                                         "pids": {"type": "integer"}}},
            "usage": {"type": ["object", "null"],
                      "description": "what the task consumed, set when it ends; null where "
                                     "the node has no cgroups (mode off)",
                      "properties": {
                          "cpu_seconds": _NUMBER_OR_NULL,
                          "memory_peak_bytes": {"type": ["integer", "null"]},
                          "processes_peak": {"type": ["integer", "null"]},
                          "source": {"type": "string", "enum": ["cgroup", "sampled"]}}},
            "oom_killed": {"type": "boolean",
                           "description": "the kernel's OOM killer ended a process of the "
                                          "task at its memory limit (the task is failed)"},
            "fanout": {"anyOf": [_ref("Fanout"), {"type": "null"}]},
            "links": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "Queue": {
        "type": "object",
        "required": ["queued", "by_priority", "tasks"],
        "properties": {
            "queued": {"type": "integer", "minimum": 0},
            "by_priority": {"type": "object",
                            "additionalProperties": {"type": "integer", "minimum": 0}},
            "tasks": {"type": "array", "items": _ref("Task"),
                      "description": "queued tasks in dispatch order (the first starts next)"},
        },
    },
    "TaskPage": {
        "type": "object",
        "required": ["tasks", "next_cursor"],
        "properties": {
            "tasks": {"type": "array", "items": _ref("Task")},
            "next_cursor": _STRING_OR_NULL,
            "unreachable": {"type": "array", "items": {"type": "string"},
                            "description": "with scope=cluster: known nodes whose tasks are "
                                           "missing (not healthy, or did not answer)"},
        },
    },
    "OutputChunks": {
        "type": "object",
        "required": ["task", "state", "next_offset", "output_bytes", "chunks"],
        "properties": {
            "task": {"type": "string"},
            "state": {"type": "string"},
            "next_offset": {"type": "integer", "minimum": 0},
            "output_bytes": {"type": "integer", "minimum": 0},
            "chunks": {"type": "array", "items": {
                "type": "object",
                "required": ["type", "task", "offset", "stream", "encoding", "data"],
                "properties": {
                    "type": {"const": "output"},
                    "task": {"type": "string"},
                    "offset": {"type": "integer", "minimum": 0},
                    "stream": {"enum": ["stdout", "stderr"]},
                    "encoding": {"enum": ["utf-8", "base64"]},
                    "data": {"type": "string"},
                },
            }},
        },
    },
    "Leader": {
        "type": "object",
        "required": ["node_id", "token", "since"],
        "properties": {
            "node_id": {"type": ["string", "null"]},
            "token": {"type": ["integer", "null"]},
            "since": _TIME,
        },
    },
    "NodeStats": _NODE_STATS,
    "Node": {
        "type": "object",
        "required": ["node_id", "hostname", "ip_address", "api_port", "state", "healthy",
                     "last_seen", "labels", "services", "stats", "is_leader"],
        "properties": {
            "node_id": {"type": "string"},
            "hostname": {"type": ["string", "null"]},
            "ip_address": _STRING_OR_NULL,
            "api_port": {"type": ["integer", "null"]},
            "state": {"type": "string"},
            "healthy": {"type": "boolean"},
            "last_seen": _TIME,
            "labels": _STRING_MAP,
            "services": {"type": "array", "items": {"type": "string"}},
            "stats": {"type": ["object", "null"]},
            "is_leader": {"type": "boolean",
                          "description": "this node is the top-level leader.node_id"},
        },
    },
    "ClusterNodes": {
        "type": "object",
        "required": ["total_nodes", "healthy_nodes", "leader", "local_node", "remote_nodes"],
        "properties": {
            "total_nodes": {"type": "integer", "minimum": 1},
            "healthy_nodes": {"type": "integer", "minimum": 0},
            "leader": _ref("Leader"),
            "local_node": _ref("Node"),
            "remote_nodes": {"type": "array", "items": _ref("Node")},
        },
    },
}

_TASK_RESPONSES = {
    "200": _json(_ref("Task"), "the task, ended (within ?wait when given)"),
    "202": _json(_ref("Task"), "accepted, still queued or running"),
}

# Answers of the internal task routes (a placed task's own answer is relayed as it came).
_INTERNAL_RESPONSES = {
    **_TASK_RESPONSES,
    "400": _error("a malformed body; the message names the field"),
    "409": _error("`stale_leader_token`: a newer leader is known, or `already_admitted`: "
                  "this node already has the task id"),
    "413": _error("body larger than max_body"),
    "415": _error("Content-Type is not application/json"),
    "422": _error("`unschedulable` (relayed from the node that placed it)"),
    "429": _error("no free slot: the sender tries the next node", retry_after=True),
    "503": _error("the node is starting, draining or overloaded, or the node a task was "
                  "sent to did not answer", retry_after=True),
}

PATHS: dict[str, Any] = {
    "/health": {"get": {
        "summary": "Liveness; needs no secret",
        "security": [],
        "responses": {"200": _json({
            "type": "object", "required": ["status", "node_id", "version"],
            "properties": {"status": {"const": "ok"}, "node_id": {"type": "string"},
                           "version": {"type": "string"}}}, "alive")},
    }},
    "/openapi.json": {"get": {
        "summary": "This document; needs no secret (it holds no data)",
        "security": [],
        "responses": {"200": _json({"type": "object", "required": ["openapi", "paths"]},
                                   "the OpenAPI document")},
    }},
    "/ready": {"get": _secured({
        "summary": "Readiness: store open, executor recovered, queue restored, discovery bound",
        "responses": {
            "200": _json(_ref("Readiness"), "ready"),
            "503": _json(_ref("Readiness"), "not ready, or draining; checks say which "
                                            "part (`not_draining`)"),
        },
    })},
    "/node/drain": {"post": _secured({
        "summary": "Drain: take no new tasks (submissions 503 `draining`, nothing started "
                   "from the queue, leaders place elsewhere); running tasks finish, or are "
                   "cancelled at `deadline`. Idempotent",
        "parameters": [{"name": "deadline", "in": "query", "required": False,
                        "description": "seconds from now after which tasks still running "
                                       "are cancelled",
                        "schema": {"type": "number", "minimum": 0, "maximum": 604800}}],
        "responses": {"200": _json(_ref("DrainState"), "draining now")},
    })},
    "/node/resume": {"post": _secured({
        "summary": "End a drain: take tasks again and start the queued ones. Idempotent",
        "responses": {"200": _json(_ref("DrainState"), "not draining")},
    })},
    "/stats": {"get": _secured({
        "summary": "Load, slots, running tasks, discovery counters",
        "responses": {"200": _json({
            "allOf": [_ref("NodeStats"), {
                "type": "object",
                "required": ["node_id", "slots", "running", "queued", "finished_since_start"],
                "properties": {"node_id": {"type": "string"},
                               "slots": {"type": "integer"},
                               "running": {"type": "integer"},
                               "queued": {"type": "integer"},
                               "finished_since_start": {"type": "integer"},
                               "cgroups": {"type": "object",
                                           "description": "mode, controllers, kill method "
                                                          "and root of the task cgroups; "
                                                          "v1: how many were made, reused "
                                                          "and are idle"},
                               "discovery": {"type": "object"}}}]}, "node statistics")},
    })},
    "/metrics": {"get": _secured({
        "summary": "Prometheus text format",
        "responses": {"200": {"description": "metrics",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    })},
    "/api/cluster/health": {"get": _secured({
        "summary": "This node's identity, load and view of the cluster",
        "responses": {"200": _json({
            "type": "object",
            "required": ["node_id", "hostname", "services", "cpu_percent", "memory_percent",
                         "active_tasks", "version", "total_nodes", "healthy_nodes", "leader"],
            "properties": {"node_id": {"type": "string"}, "hostname": {"type": "string"},
                           "services": {"type": "array", "items": {"type": "string"}},
                           "cpu_percent": _NUMBER_OR_NULL, "memory_percent": _NUMBER_OR_NULL,
                           "active_tasks": {"type": "integer"}, "version": {"type": "string"},
                           "total_nodes": {"type": "integer"},
                           "healthy_nodes": {"type": "integer"},
                           "leader": _ref("Leader")}}, "cluster health")},
    })},
    "/api/cluster/nodes": {"get": _secured({
        "summary": "Every node this node knows, itself first",
        "responses": {"200": _json(_ref("ClusterNodes"), "nodes")},
    })},
    "/api/cluster/leader": {"get": _secured({
        "summary": "The current leader (node_id null when there is none)",
        "responses": {"200": _json(_ref("Leader"), "leader")},
    })},
    "/execute": {"post": _secured({
        "summary": "Run a command (here when there is room, else placed by the leader; "
                   "`node` pins it)",
        "description": "When no node can start it now the task waits in the queue (202, "
                       "state `queued`): the node's own queue standalone, the cluster's in "
                       "Redis with `--redis`; `queue: false` asks for 429 instead. "
                       "`?wait` covers the time queued too: the answer is 200 with the "
                       "ended task once it ends within the wait, wherever it started, else "
                       "202 as it stands (queued, or running). A "
                       "repeated submit with the same Idempotency-Key (kept 24 h) returns "
                       "the first task, never a second run. The node-to-node headers "
                       "(X-Oxide-Forwarded, -Leader-Token, -Retry-Of, -Attempt, -Task-Id) "
                       "are refused here (400 `internal_header`): nodes use /internal/*.",
        "parameters": [_WAIT,
                       {"name": "Idempotency-Key", "in": "header", "required": False,
                        "schema": {"type": "string", "maxLength": 256},
                        "description": "the same key within 24 h returns the same task "
                                       "(blank: no key)"},
                       {"name": "X-Oxide-Group", "in": "header", "required": False,
                        "schema": {"type": "string", "maxLength": 256},
                        "description": "fair-share group when the body has no `group` "
                                       "(blank: the client's address)"}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": _ref("TaskRequest"),
            "example": {"command": "true", "args": [], "timeout": 5}}}},
        "responses": {
            **_TASK_RESPONSES,
            "400": _error("bad JSON or a bad field; the message names the field; "
                          "`internal_header`: a node-to-node header (X-Oxide-Forwarded, "
                          "X-Oxide-Leader-Token, X-Oxide-Retry-Of, X-Oxide-Attempt, "
                          "X-Oxide-Task-Id), which only the /internal/ routes carry"),
            "409": _error("`already_admitted`: the task id was started before"),
            "413": _error("body larger than max_body"),
            "415": _error("Content-Type is not application/json"),
            "422": _error("`unschedulable`: no known node has the labels the task asks for, "
                          "or allocatable room for the resources it declares (the message "
                          "names `resources.cpus` or `resources.memory`)"),
            "429": _error("no free slot and `queue: false`, or (with Redis) no node of the "
                          "cluster has one", retry_after=True),
            "503": _error("the host is overloaded, the chosen node is unreachable, "
                          "`draining`: this node takes no new tasks, "
                          "`placement_unknown` / `leader_unreachable`: the node the task "
                          "was sent to took it but did not answer (the message names the "
                          "task id to look up; it is never started elsewhere), "
                          "`node_unreachable`: the pinned node did not answer and the task "
                          "was not started anywhere (with Redis its id is retired), or "
                          "`queue_unavailable`: the cluster queue (Redis) failed, so nothing "
                          "was started or queued", retry_after=True),
        },
    })},
    "/internal/dispatch": {"post": _secured({
        "summary": "Internal, node to node: the leader starts a queued task on this node",
        "description": "Not for clients. Sent by the leader of a Redis cluster with its "
                       "fencing token; the node claims the task id in Redis first, so a "
                       "task never starts twice. Refused on nodes without Redis (404).",
        "x-internal": True,
        "tags": ["internal"],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False,
            "required": ["version", "task"],
            "properties": {
                "version": {"const": 1},
                "token": {"type": ["integer", "null"],
                          "description": "the dispatching leader's fencing token"},
                "task": {"type": "object", "required": ["id", "request"],
                         "description": "the queued record: id, request (TaskRequest "
                                        "without secret_env), priority, group, "
                                        "created_at, queue_timeout, entered_on"},
            }}}}},
        "responses": {
            "202": _json(_ref("Task"), "claimed and started here"),
            "400": _error("a malformed dispatch body"),
            "404": _error("this node has no cluster queue (no Redis)"),
            "409": _error("`stale_leader_token`, or `already_admitted`: the id was "
                          "claimed before"),
            "413": _error("body larger than max_body"),
            "415": _error("Content-Type is not application/json"),
            "429": _error("no free slot", retry_after=True),
            "503": _error("the node is starting, shutting down or overloaded, or "
                          "`queue_unavailable`: Redis failed before the claim",
                          retry_after=True),
        },
    })},
    "/internal/place": {"post": _secured({
        "summary": "Internal, node to node: a node hands a client's task to the leader",
        "description": "Not for clients (POST /execute refuses the node-to-node headers "
                       "of old with 400 `internal_header`). The leader places the task as "
                       "for POST /execute and answers as it would; with Redis the task "
                       "keeps the id it got where it entered (`task_id`).",
        "x-internal": True,
        "tags": ["internal"],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False,
            "required": ["version", "task"],
            "properties": {
                "version": {"const": 1},
                "task": {**_ref("TaskRequest"),
                         "description": "the client's request, its `group` settled"},
                "task_id": {"type": ["string", "null"],
                            "description": "the id given where the task entered (Redis)"},
                "idempotency_key": {"type": ["string", "null"]},
                "wait": {"type": ["number", "null"], "minimum": 0, "maximum": 300},
            }}}}},
        "responses": _INTERNAL_RESPONSES,
    })},
    "/internal/run": {"post": _secured({
        "summary": "Internal, node to node: start this task here now, or refuse",
        "description": "Not for clients. Sent by the placing node with the leader's "
                       "fencing `token`; `task_id` is the id the sender gave, and a node "
                       "refuses an id it already has (409 `already_admitted`), so a "
                       "delivery repeated after a lost reply never runs twice. A retry of "
                       "a lost task names it (`retry_of`) and its `attempt`.",
        "x-internal": True,
        "tags": ["internal"],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False,
            "required": ["version", "task"],
            "properties": {
                "version": {"const": 1},
                "task": _ref("TaskRequest"),
                "token": {"type": ["integer", "null"],
                          "description": "the placing leader's fencing token"},
                "task_id": {"type": ["string", "null"]},
                "attempt": {"type": "integer", "minimum": 1, "default": 1,
                            "description": "counted only with `retry_of`"},
                "retry_of": {"type": ["string", "null"]},
                "idempotency_key": {"type": ["string", "null"]},
                "wait": {"type": ["number", "null"], "minimum": 0, "maximum": 300},
            }}}}},
        "responses": _INTERNAL_RESPONSES,
    })},
    "/tasks": {"get": _secured({
        "summary": "Tasks, newest first",
        "parameters": [
            {"name": "state", "in": "query", "required": False,
             "schema": {"type": "string", "enum": [state.value for state in TaskState]}},
            {"name": "node", "in": "query", "required": False, "schema": {"type": "string"}},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
            {"name": "cursor", "in": "query", "required": False,
             "description": "next_cursor of the previous page", "schema": {"type": "string"}},
            {"name": "scope", "in": "query", "required": False,
             "description": "`cluster`: merge the same page from every healthy peer",
             "schema": {"type": "string", "enum": ["local", "cluster"]}},
        ],
        "responses": {"200": _json(_ref("TaskPage"), "a page of tasks"), "400": _BAD_QUERY},
    })},
    "/queue": {"get": _secured({
        "summary": "Queued tasks in dispatch order (with Redis: the whole cluster's queue)",
        "description": (
            "With Redis, any node answers from Redis and reads only the page it shows "
            "(O(limit) index reads, whatever the queue's depth); `queued` and `by_priority` "
            "come from Redis counters. Order: priority (high first), then the groups of "
            "that priority take turns, then oldest first within a group. The turns are "
            "counted from the group whose oldest task is oldest, as a leader reading the "
            "queue afresh starts them: a leader that has dispatched for a while may be "
            "part-way through its turn, so the groups of one priority can appear rotated "
            "against its next picks."),
        "parameters": [{"name": "limit", "in": "query", "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
        "responses": {"200": _json(_ref("Queue"), "the queue"), "400": _BAD_QUERY},
    })},
    "/task/{task_id}": {"get": _secured({
        "summary": "One task, from any node (forwarded to its owner)",
        "parameters": [_TASK_ID, _WAIT],
        "responses": {"200": _json(_ref("Task"), "the task"), "400": _BAD_QUERY,
                      "404": _NOT_FOUND, "503": _UNAVAILABLE},
    })},
    "/task/{task_id}/output": {"get": _secured({
        "summary": "Output bytes from an offset (stdout and stderr in order)",
        "parameters": [
            _TASK_ID, _WAIT,
            {"name": "offset", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 0, "maximum": 2**62}},
            {"name": "stream", "in": "query", "required": False,
             "schema": {"type": "string", "enum": ["stdout", "stderr"]}},
            {"name": "format", "in": "query", "required": False,
             "description": "`json`: chunks with their stream, as the WebSocket sends them",
             "schema": {"type": "string", "enum": ["raw", "json"]}},
        ],
        "responses": {
            "200": {"description": "raw bytes, or chunks with ?format=json",
                    "headers": {"X-Task-State": {"schema": {"type": "string"}},
                                "X-Next-Offset": {"schema": {"type": "string"}}},
                    "content": {
                        "application/octet-stream": {"schema": {"type": "string",
                                                                "format": "binary"}},
                        "application/json": {"schema": _ref("OutputChunks")}}},
            "400": _BAD_QUERY, "404": _NOT_FOUND, "503": _UNAVAILABLE,
        },
    })},
    "/task/{task_id}/cancel": {"post": _secured({
        "summary": "TERM the task's process group, KILL after the grace; a queued task "
                   "ends cancelled at once and never starts",
        "parameters": [_TASK_ID, _WAIT],
        "responses": {**_TASK_RESPONSES, "400": _BAD_QUERY, "404": _NOT_FOUND,
                      "409": _error("the task already ended"), "503": _UNAVAILABLE},
    })},
    "/cas/missing": {"post": _secured({
        "summary": "Which of these blob digests this node lacks (upload only those)",
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"type": "array", "items": {"type": "string",
                                                  "pattern": "^[0-9a-f]{64}$"}}}}},
        "responses": {
            "200": _json({"type": "object", "required": ["missing"],
                          "properties": {"missing": {"type": "array",
                                                     "items": {"type": "string"}}}},
                         "the digests this node does not have"),
            "400": _error("not a JSON list of SHA-256 digests"),
            "413": _error("body larger than max_body"),
            "415": _error("Content-Type is not application/json"),
        },
    })},
    "/cas/batch": {"post": _secured({
        "summary": "Store many blobs in one request (a client sends its small files so)",
        "description": "The body is frames, each `<sha256> <length>\\n` (ASCII, one "
                       "space) followed by exactly `length` bytes that must hash to "
                       "`sha256`. Frames are stored in order, each checked; a bad frame "
                       "stops the batch and the error says how many frames before it were "
                       "kept. Large blobs go by `PUT /cas/{digest}`. Stored frames "
                       "are flushed to disk once per upload: the next `PUT /cas/{digest}` "
                       "(the manifest, last) is answered after they are.",
        "requestBody": {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}},
        "responses": {
            "200": _json({"type": "object", "required": ["stored", "present", "bytes"],
                          "properties": {"stored": {"type": "integer"},
                                         "present": {"type": "integer"},
                                         "bytes": {"type": "integer"}}},
                         "blobs newly stored, blobs already here, bytes received"),
            "400": _error("a malformed frame (`bad_batch`), a bad digest, or bytes that do "
                          "not match their digest (`digest_mismatch`)"),
            "413": _error("a frame larger than workspace_cache"),
            "507": _error("no room: disk full, or the cache is full of blobs that "
                          "queued or running tasks need"),
        },
    })},
    "/cas/{digest}": {
        "put": _secured({
            "summary": "Store one blob; its bytes must hash (SHA-256) to the digest",
            "parameters": [_DIGEST],
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": {
                "200": _json(_ref("BlobStored"), "already stored"),
                "201": _json(_ref("BlobStored"), "stored"),
                "400": _error("bad digest, or the bytes do not match it "
                              "(`digest_mismatch`)"),
                "404": _error("the path is not /cas/ and 64 characters"),
                "413": _error("blob larger than workspace_cache"),
                "507": _error("no room: disk full, or the cache is full of blobs that "
                              "queued or running tasks need"),
            },
        }),
        "get": _secured({
            "summary": "One blob's bytes (nodes fetch what their tasks lack from peers)",
            "parameters": [_DIGEST],
            "responses": {
                "200": {"description": "the bytes", "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "400": _error("not a SHA-256 digest"),
                "404": _error("this node does not have the blob, or the path is not /cas/ "
                              "and 64 characters"),
            },
        }),
    },
    "/task/{task_id}/artifacts": {"get": _secured({
        "summary": "Files the task kept (its `artifacts` globs), from any node",
        "parameters": [_TASK_ID],
        "responses": {"200": _json(_ref("Artifacts"), "path, size and sha256 of each"),
                      "404": _NOT_FOUND, "503": _UNAVAILABLE},
    })},
    "/task/{task_id}/artifacts/{path}": {"get": _secured({
        "summary": "One artifact's bytes, from any node",
        "parameters": [_TASK_ID, {"name": "path", "in": "path", "required": True,
                                  "schema": {"type": "string", "minLength": 1}}],
        "responses": {"200": {"description": "the file's bytes",
                              "content": {"application/octet-stream": {
                                  "schema": {"type": "string", "format": "binary"}}}},
                      "404": _error("no such task, or it kept no such artifact"),
                      "503": _UNAVAILABLE},
    })},
    "/ws": {"get": {
        "summary": "WebSocket upgrade: live output and cluster events",
        "description": "Send `Connection: Upgrade` and `Upgrade: websocket`. The secret goes "
                       "in X-Cluster-Secret or Authorization: Bearer, or (browsers) as the "
                       "subprotocol `oxide.token.<base64url(secret)>` next to `oxide.v1`. "
                       "A request that is not an upgrade is answered 426 (after the same "
                       "secret check).",
        "security": [{"clusterSecret": []}, {"bearer": []}, {"subprotocolToken": []}],
        "responses": {"101": {"description": "switching to the WebSocket protocol"},
                      "401": _UNAUTHORIZED,
                      "426": _error("not a WebSocket upgrade request")},
    }},
    "/": {"get": {
        "summary": "Redirect to the dashboard", "security": [],
        "responses": {"302": {"description": "to /ui/"}},
    }},
    "/ui": {"get": {
        "summary": "Redirect to the dashboard", "security": [],
        "responses": {"302": {"description": "to /ui/"}},
    }},
    "/ui/": {"get": {
        "summary": "Dashboard page; static, no secret (it holds no data)", "security": [],
        "responses": {"200": {"description": "index.html",
                              "content": {"text/html": {"schema": {"type": "string"}}}}},
    }},
    "/ui/{file}": {"get": {
        "summary": "Dashboard static files (exact names only)", "security": [],
        "parameters": [{"name": "file", "in": "path", "required": True,
                        "schema": {"type": "string", "enum": ["app.js", "style.css",
                                                              "index.html"]}}],
        "responses": {"200": {"description": "the file"},
                      "404": {"description": "no such file"}},
    }},
}

SCHEMAS["Fanout"] = {
    "type": "object", "additionalProperties": False,
    "required": ["run", "index", "total", "mode"],
    "description": "part of a fan-out run (`oxide-cluster run --parallel`); the dashboard "
                   "shows a run as one row",
    "properties": {
        "run": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
        "index": {"type": "integer", "minimum": 0, "maximum": 100000,
                  "description": "0-based shard, or batch number with mode queue"},
        "total": {"type": "integer", "minimum": 1, "maximum": 100000,
                  "description": "shards, or workers with mode queue"},
        "mode": {"type": "string", "enum": ["shards", "queue"]},
    },
}
SCHEMAS["BlobStored"] = {
    "type": "object", "required": ["digest", "size", "stored"],
    "properties": {"digest": {"type": "string"}, "size": {"type": ["integer", "null"]},
                   "stored": {"type": "boolean"}},
}
SCHEMAS["Artifacts"] = {
    "type": "object", "required": ["task", "artifacts", "skipped", "cut"],
    "properties": {
        "task": {"type": "string"},
        "artifacts": {"type": "array", "items": {
            "type": "object", "required": ["path", "size", "sha256"],
            "properties": {"path": {"type": "string"}, "size": {"type": "integer"},
                           "sha256": {"type": "string"}}}},
        "skipped": {"type": "array", "items": {
            "type": "object", "required": ["path", "reason"],
            "properties": {"path": {"type": "string"}, "reason": {"type": "string"}}}},
        "cut": {"type": ["string", "null"],
                "description": "set when artifact_limit stopped keeping files"},
    },
}

SCHEMAS["Resources"] = {
    "type": "object", "additionalProperties": False,
    "description": "declared limits, enforced through the task's cgroup; a key left out "
                   "takes the node's default_resources, else unlimited",
    "properties": {
        "cpus": {"type": ["number", "null"], "minimum": 0.01, "maximum": 4096,
                 "description": "CPU time per wall second (1.5: one and a half CPUs)"},
        "memory": {"type": ["integer", "string", "null"], "minimum": 1048576,
                   "pattern": "^\\s*[0-9]+(\\.[0-9]+)?\\s*[KkMmGgTt]?([iI]?[bB])?\\s*$",
                   "description": "bytes or a size like '512M', '2G' (binary units), "
                                  "at least 1 MiB; RAM and swap together"},
        "pids": {"type": ["integer", "null"], "minimum": 1, "maximum": 4194304,
                 "description": "processes and threads at once (null: not declared)"},
    },
}

SCHEMAS["DrainState"] = {
    "type": "object", "required": ["draining", "since", "running", "queued"],
    "properties": {"draining": {"type": "boolean"},
                   "since": {"type": ["string", "null"], "format": "date-time"},
                   "deadline": {"type": ["string", "null"], "format": "date-time",
                                "description": "when tasks still running are cancelled"},
                   "running": {"type": "integer", "minimum": 0,
                               "description": "tasks still running here"},
                   "queued": {"type": "integer", "minimum": 0,
                              "description": "tasks waiting here (started after resume)"}},
}

SCHEMAS["Readiness"] = {
    "type": "object", "required": ["ready", "checks"],
    "properties": {"ready": {"type": "boolean"},
                   "draining": {"type": "boolean"},
                   "cgroups": {"type": "string", "enum": ["v2", "v1", "off"],
                               "description": "how tasks are confined on this node"},
                   "checks": {"type": "object", "additionalProperties": {"type": "boolean"}}},
}

# -- suites: recorded durations for ``run --split`` (issue 15; oxide_cluster.suites) -----

_SUITE = {"name": "name", "in": "path", "required": True,
          "description": "the suite (`--suite NAME`, default the workspace directory's name)",
          "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}}
SCHEMAS["SuiteDurations"] = {
    "type": "object", "required": ["suite", "recorded", "durations"],
    "properties": {
        "suite": {"type": "string"},
        "recorded": {"type": "boolean", "description": "false: no run recorded it yet"},
        "durations": {"type": "object", "additionalProperties": {"type": "number"},
                      "description": "workspace-relative file path to seconds"},
    },
}
PATHS["/suites/{name}/durations"] = {
    "get": _secured({
        "summary": "Per-file durations earlier runs measured ('run --split' balances by "
                   "them); kept in Redis with Redis, else in this node's store",
        "parameters": [_SUITE],
        "responses": {"200": _json(_ref("SuiteDurations"), "the durations (empty when "
                                                           "none recorded)"),
                      "400": _error("bad suite name (`bad_suite`)"),
                      "503": _UNAVAILABLE},
    }),
    "put": _secured({
        "summary": "Replace the suite's durations (the CLI sends them after a run)",
        "parameters": [_SUITE],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["durations"], "additionalProperties": False,
            "properties": {"durations": {
                "type": "object", "maxProperties": 20000,
                "propertyNames": {"type": "string", "minLength": 1, "maxLength": 1024,
                                  "pattern": "^[^/\u0000]"},
                "additionalProperties": {"type": "number", "minimum": 0,
                                         "maximum": 604800}}}}}}},
        "responses": {"200": _json(_ref("SuiteDurations"), "stored"),
                      "400": _error("bad suite name, or durations that are not relative "
                                    "paths to seconds (`bad_request`)"),
                      "413": _error("body larger than max_body"),
                      "415": _error("Content-Type is not application/json"),
                      "503": _UNAVAILABLE},
    }),
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "oxide-cluster node API",
        "version": __version__,
        "description": "Every node serves the same API; any node answers for any task. "
                       "Errors are always {\"error\": {\"code\", \"message\"}}.",
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "clusterSecret": {"type": "apiKey", "in": "header", "name": "X-Cluster-Secret"},
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "the cluster secret as a bearer token"},
            "subprotocolToken": {
                "type": "apiKey", "in": "header", "name": "Sec-WebSocket-Protocol",
                "description": "WebSocket only: oxide.v1, oxide.token.<base64url(secret)>"},
        },
    },
    "security": [{"clusterSecret": []}, {"bearer": []}],
}


def document(max_timeout: float | None = None) -> dict[str, Any]:
    """A copy, so a caller cannot change what the node serves; with ``max_timeout``, the
    node's own limit on ``timeout`` and ``idle_timeout`` (it is configurable)."""
    result = copy.deepcopy(DOCUMENT)
    if max_timeout is not None:
        fields = result["components"]["schemas"]["TaskRequest"]["properties"]
        for name in ("timeout", "idle_timeout"):
            fields[name]["maximum"] = max_timeout
    return result

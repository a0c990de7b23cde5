"""The HTTP task API (Klein): JSON in, JSON out, one error shape everywhere."""

from __future__ import annotations

import hmac
import json
import math
from typing import Any

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from oxide_cluster import __version__
from oxide_cluster.dashboard import UiFiles
from oxide_cluster.executor import CapacityError
from oxide_cluster.metrics import CONTENT_TYPE_LATEST, NodeMetrics
from oxide_cluster.model import RequestError, Task, TaskState, parse_task_request
from oxide_cluster.node import Node

MAX_WAIT = 300.0
MAX_PAGE = 1000


class ApiError(Exception):
    """Raised by a handler; rendered as ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def render_json(request: Request, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _query(request: Request, name: str) -> str | None:
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_query", f"query parameter {name!r} is not UTF-8") from None


def _query_number(request: Request, name: str, minimum: float, maximum: float,
                  integer: bool = False) -> float | None:
    raw = _query(request, name)
    if raw is None:
        return None
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ApiError(400, "bad_query", f"query parameter {name!r} must be {kind}") from None
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise ApiError(400, "bad_query",
                       f"query parameter {name!r} must be between {minimum:g} and {maximum:g}")
    return value


def _wait_for(waiter: defer.Deferred[Task] | None, seconds: float | None,
              reactor: Any) -> defer.Deferred[Task | None]:
    """Fire with the finished task, or None once ``seconds`` pass first."""
    if waiter is None or not seconds:
        return defer.succeed(None)
    waiter.addTimeout(seconds, reactor)
    return waiter.addErrback(lambda failure: failure.trap(defer.TimeoutError) and None)


class TaskApi:
    """Routes of one node. Every route but ``/health`` requires the cluster secret."""

    app = Klein()
    log = Logger()

    def __init__(self, node: Node, websocket: Any = None) -> None:
        self.node = node
        self._websocket = websocket  # the /ws resource (oxide_cluster.ws), if mounted
        self._secret = node.secret.encode()
        self.requests_total: dict[tuple[str, int], int] = {}
        self.metrics = NodeMetrics(node, self.app.url_map, self.requests_total)

    def resource(self) -> Any:
        return self.app.resource()

    # -- plumbing ---------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        supplied = request.getHeader(b"x-cluster-secret")
        if supplied is None:
            authorization = request.getHeader(b"authorization") or b""
            scheme, _, token = authorization.partition(b" ")
            supplied = token.strip() if scheme.lower() == b"bearer" else None
        if supplied is None or not hmac.compare_digest(supplied, self._secret):
            raise ApiError(401, "unauthorized",
                           "missing or wrong cluster secret (X-Cluster-Secret header)",
                           {"WWW-Authenticate": "Bearer"})

    def _json_body(self, request: Request) -> Any:
        header = request.getHeader(b"content-type") or b""
        content_type = header.split(b";")[0].strip().decode("latin-1").lower()
        if content_type and content_type != "application/json":
            raise ApiError(415, "unsupported_media_type",
                           f"send application/json, not {content_type}")
        limit = self.node.config.max_body
        length = request.getHeader(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, "body_too_large", f"request body is over {limit} bytes")
        raw = request.content.read(limit + 1) if request.content is not None else b""
        if len(raw) > limit:
            raise ApiError(413, "body_too_large", f"request body is over {limit} bytes")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as error:
            raise ApiError(400, "bad_json", f"request body is not valid JSON: {error}") from None

    async def _find_task(self, task_id: str) -> Task:
        task = self.node.executor.live_task(task_id)
        if task is None:
            task = await self.node.store.get_task(task_id)
        if task is None:
            raise ApiError(404, "task_not_found", f"no task {task_id!r} on this node")
        return task

    def _task_json(self, task: Task) -> dict[str, Any]:
        body = task.to_json()
        body["links"] = {
            "self": f"/task/{task.id}",
            "output": f"/task/{task.id}/output",
            "cancel": f"/task/{task.id}/cancel",
        }
        return body

    @app.handle_errors(ApiError)
    def _api_error(self, request: Request, failure: Failure) -> bytes:
        error: ApiError = failure.value  # type: ignore[assignment]
        for name, value in error.headers.items():
            request.setHeader(name.encode(), value.encode())
        return render_json(request, {"error": {"code": error.code, "message": error.message}},
                           error.status)

    @app.handle_errors(HTTPException)
    def _routing_error(self, request: Request, failure: Failure) -> bytes:
        """Werkzeug's routing errors (404, 405, redirects of odd paths) in our shape."""
        error: Any = failure.value
        if isinstance(error, MethodNotAllowed):
            request.setHeader(b"Allow", ", ".join(error.valid_methods or []).encode())
            method = request.method.decode("ascii", "replace")
            return render_json(request, {"error": {"code": "method_not_allowed",
                                                   "message": f"{method} is not allowed here"}},
                               405)
        status = error.code if isinstance(error.code, int) and error.code >= 400 else 404
        code = "not_found" if status == 404 else "bad_request"
        message = "no such route" if status == 404 else str(error.description)
        return render_json(request, {"error": {"code": code, "message": message}}, status)

    @app.handle_errors(Exception)
    def _internal_error(self, request: Request, failure: Failure) -> bytes:
        self.log.failure("unhandled error in {method} {path}", failure,
                         method=request.method, path=request.path)
        return render_json(request, {"error": {"code": "internal",
                                               "message": "internal error (logged)"}}, 500)

    # -- liveness and node views -------------------------------------------------

    @app.route("/health", methods=["GET"])
    def health(self, request: Request) -> bytes:
        return render_json(request, {"status": "ok", "node_id": self.node.node_id,
                                     "version": __version__})

    @app.route("/ready", methods=["GET"])
    def ready(self, request: Request) -> bytes:
        self._authorize(request)
        checks = {"store": bool(self.node.store.is_open),
                  "executor": bool(self.node.executor.ready)}
        if self.node.discovery is not None:
            checks["discovery"] = bool(self.node.discovery.bound)
        ok = all(checks.values())
        return render_json(request, {"ready": ok, "checks": checks}, 200 if ok else 503)

    @app.route("/stats", methods=["GET"])
    def stats(self, request: Request) -> bytes:
        self._authorize(request)
        executor = self.node.executor
        body = self.node.stats()
        body.update({
            "node_id": self.node.node_id,
            "slots": executor.max_tasks,
            "running": executor.running_count,
            "queued": 0,
            "finished_since_start": executor.finished_total,
        })
        if self.node.discovery is not None:
            body["discovery"] = dict(self.node.discovery.counters)
        return render_json(request, body)

    @app.route("/api/cluster/health", methods=["GET"])
    def cluster_health(self, request: Request) -> bytes:
        self._authorize(request)
        nodes = self.node.cluster_nodes()
        stats = self.node.stats()
        return render_json(request, {
            "node_id": self.node.node_id,
            "hostname": self.node.hostname,
            "services": list(self.node.services),
            "cpu_percent": stats["cpu_percent"],
            "memory_percent": stats["memory_percent"],
            "active_tasks": stats["running_tasks"],
            "version": __version__,
            "total_nodes": nodes["total_nodes"],
            "healthy_nodes": nodes["healthy_nodes"],
            "leader": nodes["leader"],
        })

    @app.route("/api/cluster/nodes", methods=["GET"])
    def cluster_nodes(self, request: Request) -> bytes:
        self._authorize(request)
        return render_json(request, self.node.cluster_nodes())

    @app.route("/api/cluster/leader", methods=["GET"])
    def cluster_leader(self, request: Request) -> bytes:
        self._authorize(request)
        return render_json(request, self.node.leader())

    @app.route("/", methods=["GET", "HEAD"])
    @app.route("/ui", methods=["GET", "HEAD"])
    def ui_redirect(self, request: Request) -> bytes:
        """The dashboard lives under ``/ui/`` so its relative URLs resolve there."""
        request.redirect(b"/ui/")
        return b""

    @app.route("/ui/", branch=True, methods=["GET", "HEAD"])
    def ui_files(self, request: Request) -> Any:
        """The dashboard's static files, without the secret: they hold no data."""
        return UiFiles()

    @app.route("/ws", branch=False)
    def websocket(self, request: Request) -> Any:
        """The WebSocket upgrade; ``oxide_cluster.ws`` checks the secret at the handshake."""
        if self._websocket is None:
            raise ApiError(404, "not_found", "no WebSocket endpoint on this node")
        # The upgraded connection leaves HTTP: its idle timeout must not cut it later.
        request.channel.setTimeout(None)
        return self._websocket

    @app.route("/metrics", methods=["GET"])
    async def metrics_text(self, request: Request) -> bytes:
        """Prometheus text format; like every route but /health it needs the secret."""
        self._authorize(request)
        body = await self.metrics.render()
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return body

    # -- tasks ------------------------------------------------------------------

    @app.route("/execute", methods=["POST"])
    async def execute(self, request: Request) -> bytes:
        self._authorize(request)
        wait = _query_number(request, "wait", 0, MAX_WAIT)
        body = self._json_body(request)
        try:
            task_request = parse_task_request(body, self.node.config.max_timeout)
        except RequestError as error:
            raise ApiError(400, "bad_request", str(error)) from None
        if task_request.node not in (None, self.node.node_id):
            raise ApiError(400, "bad_request",
                           f"node: {task_request.node!r} is not this node; "
                           "placement on other nodes needs the cluster leader")
        try:
            task = await self.node.executor.submit(task_request)
        except CapacityError as error:
            raise ApiError(error.status, error.code, error.message,
                           {"Retry-After": str(error.retry_after)}) from None
        finished = await _wait_for(self.node.executor.when_finished(task.id), wait,
                                   self.node.reactor)
        if finished is not None or task.state.terminal:
            return render_json(request, self._task_json(finished or task), 200)
        return render_json(request, self._task_json(task), 202)

    @app.route("/tasks", methods=["GET"])
    async def tasks(self, request: Request) -> bytes:
        self._authorize(request)
        state = _query(request, "state")
        if state is not None and state not in {s.value for s in TaskState}:
            raise ApiError(400, "bad_query", f"unknown state {state!r}")
        limit = int(_query_number(request, "limit", 1, MAX_PAGE, integer=True) or 100)
        cursor = _query(request, "cursor")
        node_id = _query(request, "node")
        found = await self.node.store.list_tasks(state=state, node_id=node_id,
                                                 limit=limit, before=cursor)
        tasks = [self.node.executor.live_task(task.id) or task for task in found]
        next_cursor = tasks[-1].id if len(tasks) == limit else None
        return render_json(request, {"tasks": [self._task_json(t) for t in tasks],
                                     "next_cursor": next_cursor})

    @app.route("/task/<task_id>", methods=["GET"])
    async def task(self, request: Request, task_id: str) -> bytes:
        self._authorize(request)
        wait = _query_number(request, "wait", 0, MAX_WAIT)
        task = await self._find_task(task_id)
        if not task.state.terminal:
            task = await _wait_for(self.node.executor.when_finished(task_id), wait,
                                   self.node.reactor) or task
        return render_json(request, self._task_json(task))

    @app.route("/task/<task_id>/output", methods=["GET"])
    async def output(self, request: Request, task_id: str) -> bytes:
        self._authorize(request)
        offset = int(_query_number(request, "offset", 0, 2**62, integer=True) or 0)
        stream = _query(request, "stream")
        if stream not in (None, "stdout", "stderr"):
            raise ApiError(400, "bad_query", "stream must be stdout or stderr")
        task = await self._find_task(task_id)
        chunks = await self.node.store.read_output(task_id, offset)
        data = bytearray()
        end = offset
        for start, chunk_stream, chunk in chunks:
            piece = chunk[max(0, offset - start):]
            end = start + len(chunk)
            if stream is None or chunk_stream == stream:
                data += piece
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"X-Task-State", task.state.value.encode())
        request.setHeader(b"X-Next-Offset", str(max(end, offset)).encode())
        return bytes(data)

    @app.route("/task/<task_id>/cancel", methods=["POST"])
    async def cancel(self, request: Request, task_id: str) -> bytes:
        self._authorize(request)
        wait = _query_number(request, "wait", 0, MAX_WAIT)
        task = await self._find_task(task_id)
        if task.state.terminal:
            raise ApiError(409, "task_finished",
                           f"task {task_id} already ended ({task.state.value})")
        waiter = self.node.executor.when_finished(task_id)
        self.node.executor.cancel(task_id)
        finished = await _wait_for(waiter, wait, self.node.reactor)
        if finished is not None:
            return render_json(request, self._task_json(finished), 200)
        return render_json(request, self._task_json(task), 202)

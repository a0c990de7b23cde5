"""The HTTP task API (Klein): JSON in, JSON out, one error shape everywhere."""

from __future__ import annotations

import hmac
import io
import json
import math
import mimetypes
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import urlencode

import attrs
from klein import Klein
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, static
from twisted.web.resource import Resource
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from oxide_cluster import __version__
from oxide_cluster.cas import BATCH_READ, BatchSink, BlobError
from oxide_cluster.cluster_queue import QueueUnavailable, parse_dispatch
from oxide_cluster.dashboard import UiFiles
from oxide_cluster.drain import MAX_DEADLINE
from oxide_cluster.executor import CapacityError
from oxide_cluster.forwarding import FORWARDED_HEADER, PeerReply, PeerUnavailable
from oxide_cluster.manifest import is_digest
from oxide_cluster.metrics import CONTENT_TYPE_LATEST, NodeMetrics, WebSocketClients
from oxide_cluster.model import (
    RequestError,
    Task,
    TaskRequest,
    TaskState,
    owner_of,
    parse_task_request,
)
from oxide_cluster.node import DiscoveryStatus, Node
from oxide_cluster.openapi import document as openapi_document
from oxide_cluster.routing import (
    Queued,
    Refused,
    Relayed,
    Routed,
    TaskRouter,
    parse_place,
    parse_run,
)
from oxide_cluster.scheduler import Scheduler
from oxide_cluster.store import StoreError
from oxide_cluster.suites import SuiteDurations, SuiteError, parse_durations, parse_suite_name
from oxide_cluster.workspace import ArtifactListing, Workspaces
from oxide_cluster.ws import output_messages

MAX_WAIT = 300.0
MAX_PAGE = 1000
# The fair-share group of a request without a ``group`` field (the CLI sets it).
GROUP_HEADER = b"X-Oxide-Group"
IDEMPOTENCY_HEADER = b"Idempotency-Key"
# Headers nodes once sent each other on POST /execute: now refused there, by name.
INTERNAL_HEADERS = (FORWARDED_HEADER, b"X-Oxide-Leader-Token", b"X-Oxide-Retry-Of",
                    b"X-Oxide-Attempt", b"X-Oxide-Task-Id")
MAX_HEADER_VALUE = 256


class ApiError(Exception):
    """Raised by a handler; rendered as ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def reason_phrase(status: int) -> bytes | None:
    """The standard reason phrase; Twisted's table lacks 422, 426, 429 and others."""
    known = http.RESPONSES.get(status)
    if known is not None:
        return known
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return None


class ApiRequest(Request):
    """The site's request: every status line carries its reason phrase, never
    ``429 Unknown Status``, whichever handler, error page or relay set the code.

    The API takes JSON bodies only: Twisted's form parsing of a POST body is off, which
    also skips its parse of ``Content-Type`` through the ``email`` header registry
    (about 5 % of the reactor's busy time per ``/execute``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        super().setResponseCode(code, message if message is not None else reason_phrase(code))


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


def _chunks_json(task: Task, offset: int, chunks: list[tuple[int, str, bytes]],
                 stream: str | None) -> dict[str, Any]:
    """``?format=json``: chunks with their streams, as the WebSocket sends them."""
    messages, end = [], offset
    for start, chunk_stream, chunk in chunks:
        piece = chunk[max(0, offset - start):]
        first = max(start, offset)
        end = start + len(chunk)
        if piece and (stream is None or chunk_stream == stream):
            messages.extend(output_messages(task.id, first, chunk_stream, piece))
    return {"task": task.id, "state": task.state.value, "next_offset": max(end, offset),
            "output_bytes": task.output_bytes, "chunks": messages}


class _BlobFile(static.File):
    """One stored file, streamed with Range support; a leaf, so Klein's leftover path
    segments (an artifact's ``a/b.txt``) are not looked up as children of it."""

    isLeaf = True

    def makeProducer(self, request: Any, fileForReading: Any) -> Any:
        # Read in 512 KiB pieces, not Twisted's 64 KiB: a large artifact or blob takes
        # eight times fewer turns of the reactor.
        producer = super().makeProducer(request, fileForReading)
        producer.bufferSize = 512 * 1024
        return producer


class _Utf8Paths(Resource):
    """Refuse a path that is not UTF-8 in our error shape, before Klein does: Klein
    answers it in plain text and logs a traceback, which any client could repeat."""

    isLeaf = True

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: Request) -> Any:
        try:  # what Klein decodes: the unquoted path segments and the host name
            b"/".join([*(request.prepath or []), *(request.postpath or [])]).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            return render_json(request, {"error": {"code": "bad_path",
                                                   "message": "the URL is not UTF-8"}}, 400)
        return self._inner.render(request)


class TaskApi:
    """Routes of one node. All but ``/health``, ``/openapi.json`` and ``/ui/`` need the secret."""

    app = Klein()
    log = Logger()

    def __init__(self, node: Node, router: TaskRouter | None = None, websocket: Any = None,
                 workspaces: Workspaces | None = None,
                 suites: SuiteDurations | None = None, *,
                 discovery: DiscoveryStatus | None = None,
                 websocket_hub: WebSocketClients | None = None) -> None:
        self.node = node
        self.discovery = discovery  # None: discovery is off
        self.suites = suites
        self.router = router
        self.scheduler = router.scheduler if router is not None else None
        self.cluster = router.cluster if router is not None else None
        self.peers = router.peers if router is not None else None
        self.workspaces = workspaces
        self._websocket = websocket  # the /ws resource (oxide_cluster.ws), if mounted
        self._secret = node.secret.encode()
        self.requests_total: dict[tuple[str, int], int] = {}
        depth = self.scheduler.depth_by_priority if self.scheduler is not None else None
        if self.cluster is not None:  # the queue is in Redis: the leader's view of it
            depth = self.cluster.dispatcher.depth_by_priority
        self.metrics = NodeMetrics(node, self.app.url_map, self.requests_total, depth,
                                   discovery=discovery, websocket_hub=websocket_hub)

    def resource(self) -> Any:
        return _Utf8Paths(self.app.resource())

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

    def _json_body(self, request: Request) -> tuple[bytes, Any]:
        """The raw body (forwarded as is) and its decoded JSON."""
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
            return raw, json.loads(raw)
        except (UnicodeDecodeError, ValueError) as error:
            raise ApiError(400, "bad_json", f"request body is not valid JSON: {error}") from None
        except RecursionError:  # ``[[[[…`` within max_body: refuse, not a 500
            raise ApiError(400, "bad_json", "request body is nested too deeply") from None

    @property
    def _router(self) -> TaskRouter:
        if self.router is None:
            raise ApiError(503, "starting", "this node has no scheduler yet")
        return self.router

    @property
    def _scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise ApiError(503, "starting", "this node has no scheduler yet")
        return self.scheduler

    def _live_task(self, task_id: str) -> Task | None:
        """The in-memory record of a queued or running task of this node."""
        return self._scheduler.live_task(task_id)

    async def _find_task(self, task_id: str) -> Task:
        found = await self._router.find(task_id)
        if found is None:
            raise ApiError(404, "task_not_found", f"no task {task_id!r} on this node")
        return found[0]

    def _task_json(self, task: Task, position: int | None = None) -> dict[str, Any]:
        body = task.to_json()
        if task.state is TaskState.QUEUED and self.scheduler is not None:
            body["queue_position"] = position or self.scheduler.position(task.id)
        elif task.state is TaskState.QUEUED:
            body["queue_position"] = position
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

    @app.handle_errors(StoreError)
    def _store_error(self, request: Request, failure: Failure) -> bytes:
        """A full disk or unwritable store: the node says so and stays up."""
        request.setHeader(b"Retry-After", b"5")
        return render_json(request, {"error": {"code": "store_unavailable",
                                               "message": failure.getErrorMessage()}}, 503)

    @app.handle_errors(Refused)
    def _refused(self, request: Request, failure: Failure) -> bytes:
        """The router's refusals (and capacity ones) in the error shape."""
        error: Any = failure.value
        if error.retry_after is not None:
            request.setHeader(b"Retry-After", str(error.retry_after).encode())
        return render_json(request, {"error": {"code": error.code,
                                               "message": error.message}}, error.status)

    @app.handle_errors(CapacityError)
    def _no_capacity(self, request: Request, failure: Failure) -> bytes:
        return self._refused(request, failure)

    @app.handle_errors(QueueUnavailable)
    def _queue_unavailable(self, request: Request, failure: Failure) -> bytes:
        """Redis failed on the way: nothing was started or queued on a guess."""
        request.setHeader(b"Retry-After", b"2")
        return render_json(request, {"error": {"code": "queue_unavailable",
                                               "message": failure.getErrorMessage()}}, 503)

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

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: Request) -> bytes:
        """The OpenAPI document, without the secret: it describes routes, holds no data."""
        return render_json(request, openapi_document(self.node.config.max_timeout))

    @app.route("/ready", methods=["GET"])
    def ready(self, request: Request) -> bytes:
        self._authorize(request)
        checks = {"store": bool(self.node.store.is_open),
                  "executor": bool(self.node.executor.ready)}
        if self.scheduler is not None:  # queued tasks of the last run restored
            checks["scheduler"] = self.scheduler.recovered
        if self.discovery is not None:
            checks["discovery"] = bool(self.discovery.bound)
        checks["not_draining"] = not self.node.drain.draining  # load balancers: send elsewhere
        ok = all(checks.values())
        return render_json(request, {"ready": ok, "checks": checks,
                                     "draining": self.node.drain.draining,
                                     "cgroups": self.node.executor.cgroups.mode},
                           200 if ok else 503)

    @app.route("/node/drain", methods=["POST"])
    def node_drain(self, request: Request) -> bytes:
        """Take no new tasks, let running ones finish; ``?deadline=S``: cancel those
        still running S seconds from now (idempotent)."""
        self._authorize(request)
        deadline = _query_number(request, "deadline", 0, MAX_DEADLINE)
        self._scheduler.drain(deadline)
        return self._drain_json(request)

    @app.route("/node/resume", methods=["POST"])
    def node_resume(self, request: Request) -> bytes:
        """End a drain: admit again and start what waited in the queue (idempotent)."""
        self._authorize(request)
        self._scheduler.resume()
        return self._drain_json(request)

    def _drain_json(self, request: Request) -> bytes:
        return render_json(request, {**self.node.drain.to_json(),
                                     "running": self.node.executor.running_count,
                                     "queued": len(self._scheduler)})

    @app.route("/stats", methods=["GET"])
    def stats(self, request: Request) -> bytes:
        self._authorize(request)
        executor = self.node.executor
        body = self.node.stats()
        body.update({
            "node_id": self.node.node_id,
            "slots": executor.max_tasks,
            "running": executor.running_count,
            "queued": len(self.scheduler) if self.scheduler is not None else 0,
            "finished_since_start": executor.finished_total,
            "cgroups": executor.cgroups.describe(),
        })
        if self.node.retention is not None:
            body["store"] = self.node.retention.to_json()
        if self.discovery is not None:
            body["discovery"] = dict(self.discovery.counters)
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
        if (request.getHeader(b"upgrade") or b"").lower() != b"websocket":
            # Not a handshake: refuse like any route (Autobahn would answer 200 with a page).
            self._authorize(request)
            raise ApiError(426, "upgrade_required", "/ws only accepts WebSocket upgrades",
                           {"Upgrade": "websocket", "Connection": "Upgrade"})
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
        """A client's task: run here, placed by the leader, or queued (``TaskRouter``)."""
        self._authorize(request)
        self._refuse_internal_headers(request)
        wait = _query_number(request, "wait", 0, MAX_WAIT)
        _, body = self._json_body(request)
        task_request = self._task_request(body)
        task_request, body = self._with_group(request, task_request, body)
        key = self._header_text(request, IDEMPOTENCY_HEADER)
        entered = self.node.reactor.seconds()
        routed = await self._router.submit(task_request, body, key, wait)
        if wait:  # left queued in Redis: wait there for its end (the rest of ``wait``)
            left = max(0.0, wait - (self.node.reactor.seconds() - entered))
            settled = await self._router.settle_submit(routed, left)
            if settled is not routed:  # waited already: render it as it stands
                routed, wait = settled, None
        return await self._render_routed(request, routed, wait)

    @app.route("/internal/place", methods=["POST"])
    async def internal_place(self, request: Request) -> bytes:
        """Node to node: a node hands a client's task to the leader (``PlaceBody``)."""
        self._authorize(request)
        _, body = self._json_body(request)
        try:
            place = parse_place(body)
        except RequestError as error:
            raise ApiError(400, "bad_request", str(error)) from None
        return await self._render_routed(request, await self._router.place(place),
                                         place.wait)

    @app.route("/internal/run", methods=["POST"])
    async def internal_run(self, request: Request) -> bytes:
        """Node to node: start this task here now or refuse (``RunBody``, fenced)."""
        self._authorize(request)
        _, body = self._json_body(request)
        try:
            run = parse_run(body)
        except RequestError as error:
            raise ApiError(400, "bad_request", str(error)) from None
        return await self._render_routed(request, await self._router.run(run), run.wait)

    @app.route("/internal/dispatch", methods=["POST"])
    async def internal_dispatch(self, request: Request) -> bytes:
        """Node to node: the leader starts a queued task here (body: version, token, task)."""
        self._authorize(request)
        if self.cluster is None:
            raise ApiError(404, "not_found", "this node has no cluster queue (no Redis)")
        _, body = self._json_body(request)
        try:
            token, record = parse_dispatch(body)
        except RequestError as error:
            raise ApiError(400, "bad_request", str(error)) from None
        task = await self._router.dispatched(token, record)
        return render_json(request, self._task_json(task), 202)

    def _refuse_internal_headers(self, request: Request) -> None:
        """The node-to-node headers of old are refused on the public route: placement,
        fencing and retries travel only in the bodies of the ``/internal/`` routes."""
        for name in INTERNAL_HEADERS:
            if request.getHeader(name) is not None:
                raise ApiError(400, "internal_header",
                               f"header {name.decode()} is internal: POST /execute does not "
                               "take it (nodes use the /internal/ routes)")

    def _task_request(self, body: Any) -> TaskRequest:
        try:
            return parse_task_request(body, self.node.config.max_timeout)
        except RequestError as error:
            raise ApiError(400, "bad_request", str(error)) from None

    def _with_group(self, request: Request, task_request: TaskRequest, body: dict[str, Any]
                    ) -> tuple[TaskRequest, dict[str, Any]]:
        """The request with its fair-share group: the ``group`` field, else the
        ``X-Oxide-Group`` header, else the client's address (kept when forwarded)."""
        if task_request.group is not None:
            return task_request, body
        group = self._header_text(request, GROUP_HEADER)
        if group is None:
            group = getattr(request.getClientAddress(), "host", None) or "local"
        return attrs.evolve(task_request, group=group), {**body, "group": group}

    @staticmethod
    def _header_text(request: Request, name: bytes) -> str | None:
        """A header's value as text; None when absent or blank."""
        raw = request.getHeader(name)
        if raw is None:
            return None
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            text = raw.decode("latin-1").strip()  # what HTTP/1.1 headers were
        if not text:
            return None
        if len(text) > MAX_HEADER_VALUE or not text.isprintable():
            raise ApiError(400, "bad_header", f"header {name.decode()} must be at most "
                           f"{MAX_HEADER_VALUE} printable characters")
        return text

    async def _render_routed(self, request: Request, routed: Routed,
                             wait: float | None) -> bytes:
        if isinstance(routed, Relayed):
            return self._relay(request, routed.reply)
        if isinstance(routed, Queued):
            return render_json(request, self._task_json(routed.task, routed.position), 202)
        return await self._answer(request, routed.task, wait)

    async def _answer(self, request: Request, task: Task, wait: float | None) -> bytes:
        """200 with the ended task (waiting up to ``wait``), else 202 as it stands."""
        finished = None
        if not task.state.terminal:
            finished = await _wait_for(self._scheduler.when_finished(task.id), wait,
                                       self.node.reactor)
        if finished is not None or task.state.terminal:
            return render_json(request, self._task_json(finished or task), 200)
        return render_json(request, self._task_json(task), 202)

    async def _forward(self, request: Request, node_id: str, body: bytes | None,
                       wait: float | None = None) -> bytes:
        """Owner routing of a task's reads and cancel: the peer answers it (the forwarded
        marker says so) and its reply goes back as it came."""
        if self.peers is None:
            raise ApiError(503, "node_unavailable", f"node {node_id} is not reachable")
        try:
            reply = await self.peers.request(node_id, request.method, request.uri, body,
                                             {b"Content-Type": b"application/json"},
                                             timeout=(wait or 0) + self.node.config.peer_timeout)
        except PeerUnavailable as error:
            raise ApiError(503, "node_unavailable", str(error), {"Retry-After": "1"}) from None
        return self._relay(request, reply)

    @staticmethod
    def _relay(request: Request, reply: PeerReply) -> bytes:
        request.setResponseCode(reply.status)
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        return reply.body

    async def _owner(self, request: Request, task_id: str) -> str | None:
        """The node to forward a task's request to, or None to answer here (always here
        for a call another node forwarded)."""
        if request.getHeader(FORWARDED_HEADER):
            return None
        return await self._router.locate_owner(task_id)

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
        tasks = [self._task_json(self._live_task(task.id) or task) for task in found]
        scope = _query(request, "scope")
        if scope not in (None, "local", "cluster"):
            raise ApiError(400, "bad_query", "scope must be local or cluster")
        body: dict[str, Any] = {}
        if scope == "cluster" and self.router is not None and self.router.can_fan_out:
            query = {key: values[-1] for key, values in request.args.items()
                     if key != b"scope"}
            page = await self.router.peer_tasks(b"/tasks?" + urlencode(query).encode())
            body["unreachable"] = page.unreachable
            tasks = sorted(tasks + page.tasks, key=lambda task: task["id"],
                           reverse=True)[:limit]
        body["tasks"] = tasks
        body["next_cursor"] = tasks[-1]["id"] if len(tasks) == limit else None
        return render_json(request, body)

    @app.route("/task/<task_id>", methods=["GET"])
    async def task(self, request: Request, task_id: str) -> bytes:
        self._authorize(request)
        owner = await self._owner(request, task_id)
        if owner is not None:
            try:
                return await self._forward(request, owner, None,
                                           _query_number(request, "wait", 0, MAX_WAIT))
            except ApiError as error:
                lost = await self._router.lost_elsewhere(task_id)
                if error.code != "node_unavailable" or lost is None:
                    raise
                return render_json(request, lost)
        wait = _query_number(request, "wait", 0, MAX_WAIT)
        try:
            task = await self._find_task(task_id)
        except ApiError:
            # Queued at the first read of Redis, claimed by a node before the second: ask
            # again where it runs (a poll answered 404 in that window).
            moved = await self._owner(request, task_id) if self.cluster is not None else None
            if moved is not None:
                return await self._forward(request, moved, None, wait)
            # An owner long dead is forgotten by membership; the leader's record remains.
            lost = None if owner_of(task_id) == self.node.node_id \
                else await self._router.lost_elsewhere(task_id)
            if lost is None:
                raise
            return render_json(request, lost)
        if wait and self._router.waits_in_cluster_queue(task):
            waited = await self._router.when_finished(task_id, wait)
            if isinstance(waited, Relayed):
                return self._relay(request, waited.reply)
            position = waited.position if isinstance(waited, Queued) else None
            return render_json(request, self._task_json(waited.task, position))
        if not task.state.terminal:
            task = await _wait_for(self._scheduler.when_finished(task_id), wait,
                                   self.node.reactor) or task
        return render_json(request, self._task_json(task))

    @app.route("/queue", methods=["GET"])
    async def queue(self, request: Request) -> bytes:
        """Queued tasks in dispatch order (the first starts next): the cluster's, read
        from Redis, when there is one; else this node's."""
        self._authorize(request)
        limit = int(_query_number(request, "limit", 1, MAX_PAGE, integer=True) or MAX_PAGE)
        listing = await self._router.queue(limit)
        tasks = [self._task_json(task, position)
                 for position, task in enumerate(listing.tasks, start=1)]
        queued, depth = listing.queued, listing.by_priority
        return render_json(request, {"queued": queued,
                                     "by_priority": {str(priority): count for priority, count
                                                     in sorted(depth.items(), reverse=True)},
                                     "tasks": tasks})

    @app.route("/task/<task_id>/output", methods=["GET"])
    async def output(self, request: Request, task_id: str) -> bytes:
        self._authorize(request)
        owner = await self._owner(request, task_id)
        if owner is not None:
            return await self._forward(request, owner, None,
                                       _query_number(request, "wait", 0, MAX_WAIT))
        offset = int(_query_number(request, "offset", 0, 2**62, integer=True) or 0)
        wait = _query_number(request, "wait", 0, MAX_WAIT)
        stream = _query(request, "stream")
        if stream not in (None, "stdout", "stderr"):
            raise ApiError(400, "bad_query", "stream must be stdout or stderr")
        output_format = _query(request, "format")
        if output_format not in (None, "raw", "json"):
            raise ApiError(400, "bad_query", "format must be raw or json")
        task = await self._find_task(task_id)
        chunks = await self.node.store.read_output(task_id, offset)
        if not chunks and wait:
            # Long-poll: answer as soon as output past ``offset`` exists or the task ends.
            arrived = self.node.executor.when_output_past(task_id, offset)
            if arrived is not None:
                arrived.addTimeout(wait, cast(IReactorTime, self.node.reactor))
                await arrived.addErrback(lambda f: f.trap(defer.TimeoutError) and None)
                task = await self._find_task(task_id)
                chunks = await self.node.store.read_output(task_id, offset)
        if output_format == "json":
            return render_json(request, _chunks_json(task, offset, chunks, stream))
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
        owner = await self._owner(request, task_id)
        if owner is not None:
            return await self._forward(request, owner, b"",
                                       _query_number(request, "wait", 0, MAX_WAIT))
        wait = _query_number(request, "wait", 0, MAX_WAIT)
        task = await self._find_task(task_id)
        if task.state.terminal:
            raise ApiError(409, "task_finished",
                           f"task {task_id} already ended ({task.state.value})")
        waiter = self._scheduler.when_finished(task_id)
        if waiter is None and task.state is TaskState.QUEUED:
            ended = await self._router.cancel_queued(task)  # queued in Redis
            if ended is not None:
                return render_json(request, self._task_json(ended), 200)
        self._scheduler.cancel(task_id)
        finished = await _wait_for(waiter, wait, self.node.reactor)
        if finished is not None or task.state.terminal:  # a queued task ends at once
            return render_json(request, self._task_json(finished or task), 200)
        return render_json(request, self._task_json(task), 202)

    # -- content-addressed blobs and artifacts (logic in cas.py and workspace.py) -------

    def _blobs(self) -> Workspaces:
        if self.workspaces is None:
            raise ApiError(404, "not_found", "this node keeps no blobs")
        return self.workspaces

    @staticmethod
    def _digest(digest: str) -> str:
        if not is_digest(digest):
            raise ApiError(400, "bad_digest",
                           "a digest is 64 lowercase hex characters (SHA-256)")
        return digest

    @app.route("/cas/missing", methods=["POST"])
    async def cas_missing(self, request: Request) -> bytes:
        """Which of these digests this node lacks: a client uploads only those."""
        self._authorize(request)
        workspaces = self._blobs()
        _, body = self._json_body(request)
        if not isinstance(body, list) or not all(is_digest(item) for item in body):
            raise ApiError(400, "bad_request",
                           "send a JSON list of digests (64 lowercase hex characters)")
        await workspaces.blobs.loaded
        return render_json(request, {"missing": workspaces.blobs.missing(body)})

    @app.route("/cas/batch", methods=["POST"])
    async def cas_batch(self, request: Request) -> bytes:
        """Many small blobs in one body of ``<sha256> <length>\\n<bytes>`` frames."""
        self._authorize(request)
        blobs = self._blobs().blobs
        length = request.getHeader(b"content-length")
        content = request.content
        if content is None or length in (None, b"0"):
            raise ApiError(400, "bad_batch", "the body is required: frames of "
                                             "'<sha256> <length>\\n' and the bytes")
        try:
            if isinstance(content, BatchSink):  # written as it arrived (cas_http.py)
                result = await content.finish()
            else:
                result = await blobs.put_batch(content)
        except BlobError as error:
            raise ApiError(error.status, error.code, error.message) from None
        return render_json(request, {"stored": result.stored, "present": result.present,
                                     "bytes": result.size})

    def batch_sink(self, request: Request, length: int) -> BatchSink | None:
        """For ``cas_http.UploadRequest``: an authorized batch body's sink (else None:
        spooled, and refused by the handler as usual)."""
        if self.workspaces is None:
            return None
        try:
            self._authorize(request)
        except ApiError:
            return None
        transport: Any = request.channel.transport  # a TCP/TLS transport: a producer
        if isinstance(getattr(transport, "bufferSize", None), int):
            # A TCP transport reads 64 KiB a time: a thousand and more reactor turns
            # (and GIL hand-overs to the writing thread) per 100 MB.
            transport.bufferSize = BATCH_READ
        return self.workspaces.blobs.batch_sink(length, transport.pauseProducing,
                                                transport.resumeProducing)

    # 64 characters, so /cas/missing is never taken for a digest (PUT there is a 405).
    @app.route("/cas/<string(length=64):digest>", methods=["PUT"])
    async def cas_put(self, request: Request, digest: str) -> bytes:
        """Store one blob; its bytes must hash to ``digest``."""
        self._authorize(request)
        blobs = self._blobs().blobs
        self._digest(digest)
        length = request.getHeader(b"content-length")
        if length is not None and length.isdigit() and int(length) > blobs.capacity:
            raise ApiError(413, "blob_too_large",
                           f"blob is over the limit of {blobs.capacity} bytes "
                           "(workspace_cache)")
        content: Any = request.content if request.content is not None else io.BytesIO()
        try:
            created = await blobs.put_file(digest, content)
        except BlobError as error:
            raise ApiError(error.status, error.code, error.message) from None
        return render_json(request, {"digest": digest, "size": blobs.size(digest),
                                     "stored": created}, 201 if created else 200)

    @app.route("/cas/<string(length=64):digest>", methods=["GET"])
    async def cas_get(self, request: Request, digest: str) -> Any:
        """One blob's bytes (node to node: a node fetches the blobs its task lacks)."""
        self._authorize(request)
        blobs = self._blobs().blobs
        self._digest(digest)
        await blobs.loaded
        if not blobs.has(digest):
            raise ApiError(404, "blob_not_found", f"no blob {digest} on this node")
        blobs.touch(digest)
        return _BlobFile(str(blobs.path(digest)), defaultType="application/octet-stream")

    async def _artifact_listing(self, request: Request, task_id: str) -> ArtifactListing:
        workspaces = self._blobs()
        task = await self._find_task(task_id)
        if task.state.terminal:
            ending = self.node.executor.when_finished(task_id)
            if ending is not None:  # ended, artifacts being kept: answer once they are
                await ending
        return await workspaces.listing(task_id) or ArtifactListing(task_id)

    @app.route("/task/<task_id>/artifacts", methods=["GET"])
    async def artifacts(self, request: Request, task_id: str) -> bytes:
        """The files a task left that matched its ``artifacts`` globs (from any node)."""
        self._authorize(request)
        owner = await self._owner(request, task_id)
        if owner is not None:
            return await self._forward(request, owner, None)
        listing = await self._artifact_listing(request, task_id)
        return render_json(request, listing.to_json())

    @app.route("/task/<task_id>/artifacts/<path:path>", methods=["GET"])
    async def artifact(self, request: Request, task_id: str, path: str) -> Any:
        """One artifact's bytes."""
        self._authorize(request)
        owner = await self._owner(request, task_id)
        if owner is not None:
            return await self._forward(request, owner, None)
        listing = await self._artifact_listing(request, task_id)
        entry = listing.find(path)
        if entry is None:
            raise ApiError(404, "artifact_not_found",
                           f"task {task_id} kept no artifact {path!r}")
        served = _BlobFile(str(self._blobs().blobs.path(entry["sha256"])))
        served.type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        served.encoding = None
        return served

    # -- suites: recorded durations for ``run --split`` (issue 15; oxide_cluster.suites) --

    def _suites(self, name: str) -> tuple[SuiteDurations, str]:
        if self.suites is None:
            raise ApiError(404, "not_found", "this node keeps no suite durations")
        try:
            return self.suites, parse_suite_name(name)
        except SuiteError as error:
            raise ApiError(400, "bad_suite", str(error)) from None

    @app.route("/suites/<name>/durations", methods=["GET"])
    async def suite_durations(self, request: Request, name: str) -> bytes:
        """What earlier runs of the suite measured per file (empty when never recorded)."""
        self._authorize(request)
        suites, suite = self._suites(name)
        durations = await suites.get(suite)
        return render_json(request, {"suite": suite, "recorded": durations is not None,
                                     "durations": durations or {}})

    @app.route("/suites/<name>/durations", methods=["PUT"])
    async def put_suite_durations(self, request: Request, name: str) -> bytes:
        """Replace the suite's durations (the CLI sends the old ones updated by a run)."""
        self._authorize(request)
        suites, suite = self._suites(name)
        _, body = self._json_body(request)
        try:
            durations = parse_durations(body)
        except SuiteError as error:
            raise ApiError(400, "bad_request", str(error)) from None
        await suites.put(suite, durations)
        return render_json(request, {"suite": suite, "recorded": True,
                                     "durations": durations})

"""Where a task goes: the scheduler-side routing of the cluster, out of the HTTP layer.

``TaskRouter`` owns every decision between a client's submit and a start: standalone or
pinned, placed by this node as leader, handed to the leader (``POST /internal/place``),
placed on a node (``POST /internal/run``), queued in Redis; the retry of a lost task; and
"which node has task X". The API parses, calls it and renders what it returns; refusals
are :class:`Refused` (one mapping to the HTTP error shape, in ``api.py``).

Node-to-node bodies are versioned and parsed here (``parse_place``, ``parse_run``), like
``cluster_queue.parse_dispatch``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from oxide_cluster.cgroups import Resources
from oxide_cluster.cluster_queue import (
    AlreadyAdmitted,
    ClusterQueue,
    First,
    QueueUnavailable,
    StaleToken,
    list_queue,
)
from oxide_cluster.executor import CapacityError
from oxide_cluster.forwarding import PeerReply, PeerUnavailable
from oxide_cluster.interfaces import ClusterDirectory
from oxide_cluster.membership import Membership
from oxide_cluster.model import (
    TERMINAL_STATES,
    RequestError,
    Task,
    TaskRequest,
    TaskState,
    new_task_id,
    owner_of,
    parse_task_request,
)
from oxide_cluster.node import Elector
from oxide_cluster.queue_waits import QUEUED, QueueWaits
from oxide_cluster.scheduler import IDEMPOTENCY_TTL, Scheduler, SeenTask, Unschedulable

PLACE_PATH = b"/internal/place"
RUN_PATH = b"/internal/run"
# How much longer than the task's own ``wait`` a node-to-node call may take.
# Request fields a queued task's record keeps (never ``secret_env``).
_UNQUEUED_FIELDS = ("secret_env", "node", "queue")


class Refused(Exception):
    """A submit or lookup the router turns down; ``api.py`` renders it as an error."""

    def __init__(self, status: int, code: str, message: str,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


# Refusals after which no node has the task or ever will (not those saying it may run:
# leader_unreachable, placement_unknown, node_unavailable): a held Idempotency-Key is
# freed, so the client's next submit with the key makes a task.
TOOK_NOTHING = frozenset({
    "no_capacity", "no_free_slots", "leader_changed", "starting", "cpu_busy", "memory_busy",
    "shutting_down", "draining", "unschedulable", "bad_request", "queue_unavailable",
    "node_unreachable"})


def _refusal_code(reply: PeerReply) -> str | None:
    """The ``error.code`` of a relayed 4xx/5xx answer (None for a task or no JSON)."""
    if reply.status < 400:
        return None
    try:
        code = json.loads(reply.body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


# -- wire bodies of the internal routes ------------------------------------------------


def _optional(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise RequestError(name, f"must be {'a number' if kind is not str else 'a string'} "
                                 "or null")
    return value


def _checked(body: Any, fields: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise RequestError(unknown[0], "unknown field")
    if body.get("version") != 1:
        raise RequestError("version", "must be 1")
    if not isinstance(body.get("task"), dict):
        raise RequestError("task", "must be the task request (a JSON object)")
    wait = _optional(body, "wait", (int, float))
    if wait is not None and not 0 <= wait <= 300:
        raise RequestError("wait", "must be between 0 and 300")
    return body


@attrs.frozen
class PlaceBody:
    """``POST /internal/place``: a node hands a client's task to the leader. The task's
    ``group`` is settled inside ``task``; ``task_id`` is the id given where it entered
    (Redis clusters)."""

    task: dict[str, Any]
    task_id: str | None = None
    idempotency_key: str | None = None
    wait: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, **attrs.asdict(self)}


@attrs.frozen
class RunBody:
    """``POST /internal/run``: start this task here, now or refuse (429/503) so the
    sender tries the next node. ``token`` fences a deposed leader; ``task_id`` is the id
    the sender gave (a node refuses an id it has seen); ``attempt``/``retry_of`` mark the
    retry of a lost task."""

    task: dict[str, Any]
    token: int | None = None
    task_id: str | None = None
    attempt: int = 1
    retry_of: str | None = None
    idempotency_key: str | None = None
    wait: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, **attrs.asdict(self)}


_PLACE_FIELDS = frozenset({"version", *attrs.fields_dict(PlaceBody)})
_RUN_FIELDS = frozenset({"version", *attrs.fields_dict(RunBody)})


def parse_place(body: Any) -> PlaceBody:
    """The body of ``/internal/place``; RequestError naming what is wrong."""
    body = _checked(body, _PLACE_FIELDS)
    return PlaceBody(task=dict(body["task"]), task_id=_optional(body, "task_id", str),
                     idempotency_key=_optional(body, "idempotency_key", str),
                     wait=_optional(body, "wait", (int, float)))


def parse_run(body: Any) -> RunBody:
    """The body of ``/internal/run``; RequestError naming what is wrong."""
    body = _checked(body, _RUN_FIELDS)
    token = _optional(body, "token", int)
    attempt = body.get("attempt", 1)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise RequestError("attempt", "must be a whole number of at least 1")
    retry_of = _optional(body, "retry_of", str)  # ``attempt`` counts only with it
    return RunBody(task=dict(body["task"]), token=token,
                   task_id=_optional(body, "task_id", str), attempt=attempt,
                   retry_of=retry_of,
                   idempotency_key=_optional(body, "idempotency_key", str),
                   wait=_optional(body, "wait", (int, float)))


# -- what routing answers ---------------------------------------------------------------


@attrs.frozen
class Admitted:
    """A task of this node (started, queued here, or found): rendered after ``wait``."""

    task: Task


@attrs.frozen
class Queued:
    """A task queued in the cluster's Redis queue, with its position there."""

    task: Task
    position: int | None


@attrs.frozen
class Relayed:
    """Another node's answer, passed on to the client as it came."""

    reply: PeerReply


Routed = Admitted | Queued | Relayed


@attrs.frozen
class PeerPage:
    """``GET /tasks?scope=cluster``: the peers' tasks, and the nodes missing from them."""

    tasks: list[dict[str, Any]]
    unreachable: list[str]


@attrs.frozen
class QueueView:
    """``GET /queue``: queued tasks in dispatch order, the count and depth by priority."""

    tasks: list[Task]
    queued: int
    by_priority: dict[int, int]


def _reply_task(reply: PeerReply) -> dict[str, Any]:
    try:
        body = json.loads(reply.body)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _queued_id(reply: PeerReply) -> str | None:
    """The id of a task a peer's reply says is queued."""
    body = _reply_task(reply)
    task_id = body.get("id")
    return task_id if body.get("state") == QUEUED and isinstance(task_id, str) else None


def _ended(reply: PeerReply) -> bool:
    return _reply_task(reply).get("state") in {state.value for state in TERMINAL_STATES}


# -- collaborators ------------------------------------------------------------------------


class Peers(Protocol):
    """``forwarding.PeerClient``."""

    def knows(self, node_id: str) -> bool: ...

    async def request(self, node_id: str, method: bytes, path: bytes, body: bytes | None = None,
                      headers: dict[bytes, bytes] | None = None,
                      timeout: float | None = None) -> PeerReply: ...


class Placer(Protocol):
    """``placement.Placement``."""

    def choose(self, labels: Mapping[str, str], exclude: Any = (),
               resources: Resources | None = None) -> list[str]: ...

    def placed(self, node_id: str) -> None: ...


class TaskFactory(Protocol):
    def new_task(self, request: TaskRequest, *, task_id: str | None = None,
                 attempt: int = 1, retry_of: str | None = None) -> Task: ...


@attrs.frozen
class RouterSettings:
    node_id: str
    labels: Mapping[str, str]
    max_timeout: float
    queue_timeout: float
    peer_timeout: float = 30.0  # beyond a request's own wait, for a peer's answer


class TaskRouter:
    """Submit routing, the leader's placement, retries of lost tasks, task location."""

    log = Logger()

    def __init__(self, settings: RouterSettings, reactor: Any, elector: Elector,
                 scheduler: Scheduler, tasks: TaskFactory, *, peers: Peers | None = None,
                 placement: Placer | None = None, directory: ClusterDirectory | None = None,
                 cluster: ClusterQueue | None = None,
                 membership: Membership | None = None) -> None:
        self._settings = settings
        self._node_id = settings.node_id
        self._reactor = reactor
        self._elector = elector
        self.scheduler = scheduler
        self._tasks = tasks
        self.peers = peers
        self._placement = placement
        self._directory = directory
        self.cluster = cluster
        self._membership = membership
        self._waits = QueueWaits(reactor, cluster.backend) if cluster is not None else None

    # -- a client's submit -------------------------------------------------------------

    async def submit(self, request: TaskRequest, body: dict[str, Any], key: str | None,
                     wait: float | None) -> Routed:
        """A client's task, ``body`` its JSON with the group settled."""
        try:
            self.scheduler.check_schedulable(request.labels, request.resources)
        except Unschedulable as error:
            raise Refused(422, "unschedulable", str(error)) from None
        if self.cluster is not None:
            # A Redis cluster: the id is given here, before any forward; the key is
            # held in Redis, so a repeat on any node names the same task.
            task_id = new_task_id(self._reactor.seconds(), self._node_id)
            if key is None:
                return await self._cluster_route(request, body, wait, task_id, key, entry=True)
            held = await self.cluster.backend.hold_key(key, task_id, IDEMPOTENCY_TTL)
            if held != task_id:
                return await self.known(held, request)
            try:
                routed = await self._cluster_route(request, body, wait, task_id, key,
                                                   entry=True)
            except (Refused, CapacityError, QueueUnavailable) as error:
                code = "queue_unavailable" if isinstance(error, QueueUnavailable) \
                    else error.code
                if code in TOOK_NOTHING:
                    await self._free_key(key, task_id)
                raise
            if isinstance(routed, Relayed) and _refusal_code(routed.reply) in TOOK_NOTHING:
                await self._free_key(key, task_id)
            return routed
        if key is not None:  # before any forward: a repeat must not run elsewhere
            earlier = await self.scheduler.idempotent(key)
            if earlier is not None:
                return Admitted(earlier)
        # Standalone, this node's scheduler queues what it cannot start now.
        queueable = self._directory is None
        pinned = request.node
        if pinned == self._node_id or self.peers is None:
            return await self._run_here(request, key=key, queueable=queueable)
        if pinned is not None:
            return await self._send_run(request, pinned, body, wait, key=key,
                                        task_id=self._new_id(pinned))
        if self._elector.is_leader:
            return await self._place(request, body, wait, key=key, queueable=queueable)
        leader = self._elector.leader().get("node_id")
        if leader not in (None, self._node_id):
            try:
                return Relayed(await self._ask(leader, PLACE_PATH,
                                               PlaceBody(body, None, key, wait).to_json(),
                                               wait))
            except PeerUnavailable as error:
                if error.sent:
                    # The leader may have placed it: running it here could run it twice.
                    raise Refused(503, "leader_unreachable",
                                  f"the leader {leader} took the task but did not answer "
                                  f"({error}); it was not run here, as the leader may have "
                                  "placed it: list it with GET /tasks?scope=cluster before "
                                  "submitting again", 5) from None
                self.log.warn("leader {leader} unreachable, never reached: admitting "
                              "locally", leader=leader)
        return await self._run_here(request)

    # -- the internal routes ----------------------------------------------------------

    async def place(self, body: PlaceBody) -> Routed:
        """``/internal/place``: another node hands a client's task to this (leader) node."""
        request = self._parse(body.task)
        if self.cluster is not None and body.task_id is not None:
            return await self._cluster_route(request, body.task, body.wait, body.task_id,
                                             body.idempotency_key, entry=False)
        queueable = self._directory is None
        pinned = request.node
        if pinned == self._node_id or self.peers is None:
            return await self._run_here(request, key=body.idempotency_key,
                                        queueable=queueable)
        if pinned is not None:
            return await self._send_run(request, pinned, body.task, body.wait,
                                        key=body.idempotency_key, task_id=self._new_id(pinned))
        if self._elector.is_leader:
            return await self._place(request, body.task, body.wait,
                                     key=body.idempotency_key, queueable=queueable)
        # No longer the leader: it was handed here, so it is admitted here.
        return await self._run_here(request, key=body.idempotency_key)

    async def run(self, body: RunBody) -> Routed:
        """``/internal/run``: start the task here now, or refuse (429/503)."""
        if body.token is not None and not self._elector.observe_token(body.token):
            raise Refused(409, "stale_leader_token",
                          f"placement by leader token {body.token}, but a newer leader "
                          f"({self._elector.highest_token}) is known: the sender no "
                          "longer leads")
        request = self._parse(body.task)
        if body.retry_of is not None:  # a lost task's new attempt, a new id: no claim
            return await self._run_here(request, attempt=body.attempt,
                                        retry_of=body.retry_of, task_id=body.task_id)
        if self.cluster is not None and body.task_id is not None:
            return await self._start_claimed(request, body.task_id)
        queueable = self._directory is None and request.node == self._node_id
        return await self._run_here(request, key=body.idempotency_key, queueable=queueable,
                                    task_id=body.task_id)

    # -- a Redis cluster --------------------------------------------------------------

    async def _cluster_route(self, request: TaskRequest, body: dict[str, Any],
                             wait: float | None, task_id: str, key: str | None,
                             entry: bool) -> Routed:
        """Start where the leader places it, else queue it in Redis.

        Never runs a task here on a guess: a follower that cannot reach the leader queues
        the task in Redis, and every start claims the id there first (exactly once)."""
        pinned = request.node
        if pinned == self._node_id or self.peers is None:
            if self.peers is None and not self._elector.is_leader:
                return await self._enqueue(request, body, task_id, key)
            return await self._start_claimed(request, task_id)
        if pinned is not None:
            return await self._send_run(request, pinned, body, wait, key=key, task_id=task_id)
        if entry:  # no hop when it can start here and nothing waits (cluster_queue)
            assert self.cluster is not None
            try:
                first = await self.cluster.admission.start_first(request, task_id)
            except AlreadyAdmitted as error:
                raise Refused(409, "already_admitted", str(error)) from None
            if first is First.QUEUE and request.queue and not request.secret_env:
                return await self._enqueue(request, body, task_id, key)
            if not isinstance(first, First):
                await self.recorded(first.id)
                return Admitted(first)
        if self._elector.is_leader:
            return await self._place(request, body, wait, key=key, task_id=task_id)
        leader = self._elector.leader().get("node_id")
        if entry and leader not in (None, self._node_id):
            try:
                return Relayed(await self._ask(
                    leader, PLACE_PATH, PlaceBody(body, task_id, key, wait).to_json(), wait))
            except PeerUnavailable:
                self.log.warn("leader {leader} unreachable: task {task_id} stays queued in "
                              "Redis", leader=leader, task_id=task_id)
        return await self._enqueue(request, body, task_id, key)

    async def dispatched(self, token: int | None, record: dict[str, Any]) -> Task:
        """``/internal/dispatch``: the leader starts a task queued in Redis here."""
        assert self.cluster is not None
        try:
            task = await self.cluster.admission.dispatched(token, record)
        except RequestError as error:
            raise Refused(400, "bad_request", str(error)) from None
        except StaleToken as error:
            raise Refused(409, "stale_leader_token", str(error)) from None
        except AlreadyAdmitted as error:
            raise Refused(409, "already_admitted", str(error)) from None
        await self.recorded(task.id)
        return task

    async def _start_claimed(self, request: TaskRequest, task_id: str) -> Admitted:
        assert self.cluster is not None
        try:
            task = await self.cluster.admission.start(request, task_id)
        except AlreadyAdmitted as error:
            raise Refused(409, "already_admitted", str(error)) from None
        if self._directory is not None:
            await self._directory.recorded(task.id)
        return Admitted(task)

    async def _enqueue(self, request: TaskRequest, body: dict[str, Any], task_id: str,
                       key: str | None) -> Routed:
        """Queue the task in Redis (202 ``queued``); the leader dispatches it."""
        assert self.cluster is not None
        if not request.queue:
            raise Refused(429, "no_capacity", "no node can take the task now and the "
                          "request says queue: false", 1)
        if request.secret_env:
            raise Refused(429, "no_capacity", "no node can take the task now, and a task "
                          "with secret_env is not queued across the cluster (its values "
                          "are never stored); retry later", 1)
        record = self._record(request, body, task_id, key)
        self.cluster.watch.add(task_id, record)
        try:
            queued = await self.cluster.backend.enqueue(task_id, record)
        except QueueUnavailable:
            # Maybe queued after all (a reply lost): the watch ends it if so.
            self.cluster.watch.withdraw(task_id)
            raise
        self.cluster.dispatcher.wake()
        if not queued:  # admitted meanwhile (a slow leader placed it): say where it is
            return await self.known(task_id, request)
        position = await self.cluster.backend.position(task_id)
        return Queued(self.record_task(record), position)

    def _record(self, request: TaskRequest, body: dict[str, Any], task_id: str,
                key: str | None) -> dict[str, Any]:
        """A task's record in the cluster queue (secrets never stored)."""
        return {
            "id": task_id,
            "request": {k: v for k, v in body.items() if k not in _UNQUEUED_FIELDS},
            "priority": request.priority,
            "group": request.group or "default",
            "created_at": self._reactor.seconds(),
            "queue_timeout": request.queue_timeout or self._settings.queue_timeout,
            "entered_on": self._node_id,
            "idempotency_key": key,
        }

    async def queue(self, limit: int) -> QueueView:
        """The cluster's queue, read from Redis, when there is one; else this node's."""
        if self.cluster is None:
            return QueueView(self.scheduler.queued(limit), len(self.scheduler),
                             self.scheduler.depth_by_priority())
        listing = await list_queue(self.cluster.backend, limit)
        tasks = []
        for record in listing.records:
            task = self.record_task(record)
            task.state = TaskState.QUEUED
            tasks.append(task)
        return QueueView(tasks, listing.queued, listing.by_priority)

    # -- ?wait on a task queued in Redis ---------------------------------------------

    def waits_in_cluster_queue(self, task: Task) -> bool:
        """The task is queued in Redis (not in this node's own queue): ``?wait`` on it
        needs :meth:`when_finished`."""
        return (self._waits is not None and task.state is TaskState.QUEUED
                and self.scheduler.live_task(task.id) is None)

    async def settle_submit(self, routed: Routed, wait: float | None) -> Routed:
        """A submit's ``?wait`` when it was left queued in Redis (here, or as the leader
        answered): followed until it ends or ``wait`` passes, in ``POST /execute``'s
        terms (a task JSON still not ended is a 202)."""
        task_id = None
        if isinstance(routed, Queued):
            task_id = routed.task.id
        elif isinstance(routed, Relayed) and routed.reply.status == 202:
            task_id = _queued_id(routed.reply)
        if not wait or task_id is None or self._waits is None:
            return routed
        waited = await self.when_finished(task_id, wait)
        if isinstance(waited, Relayed) and waited.reply.status == 200 \
                and not _ended(waited.reply):
            return Relayed(attrs.evolve(waited.reply, status=202))
        return waited

    async def when_finished(self, task_id: str, timeout: float) -> Routed:
        """A task queued in Redis, once it ends or ``timeout`` passes: :class:`Queued` when
        still queued; :class:`Admitted` when it ended in the queue (cancelled, rejected)
        or runs here (waited on here); :class:`Relayed` with its owner's answer to
        ``GET /task/{id}?wait=<the time left>`` when it started on another node."""
        assert self._waits is not None and self.cluster is not None
        deadline = self._reactor.seconds() + timeout
        state = await self._waits.left_queue(task_id, timeout)
        left = max(0.0, deadline - self._reactor.seconds())
        if state == "started" and self.scheduler.live_task(task_id) is None:
            owner = await self._started_on(task_id)
            if owner is not None and owner != self._node_id and self.peers is not None:
                try:
                    reply = await self.peers.request(
                        owner, b"GET", f"/task/{task_id}?wait={left:.3f}".encode(),
                        timeout=left + self._settings.peer_timeout)
                except PeerUnavailable as error:
                    self.log.info("task {task_id}: its node {node_id} did not answer the "
                                  "wait: {error}", task_id=task_id, node_id=owner,
                                  error=error)
                else:
                    if reply.status == 200:
                        return Relayed(reply)
        found = await self.find(task_id)
        if found is None:
            raise Refused(404, "task_not_found", f"no task {task_id!r} in the cluster")
        task, position = found
        if task.state is TaskState.QUEUED and state == QUEUED:
            return Queued(task, position)
        waiter = self.scheduler.when_finished(task_id) if not task.state.terminal else None
        if waiter is not None and left > 0:  # it runs here: wait for its end here
            waiter.addTimeout(left, self._reactor)
            ended = await waiter.addErrback(lambda f: f.trap(defer.TimeoutError) and None)
            task = ended or task
        return Admitted(task)

    async def _started_on(self, task_id: str) -> str | None:
        """The node whose claim Redis holds (else the owner lookup's answer)."""
        assert self.cluster is not None
        try:
            entry = await self.cluster.backend.where(task_id)
        except QueueUnavailable:
            entry = None
        if entry is not None and entry.node is not None:
            return entry.node
        return await self.locate_owner(task_id)

    async def cancel_queued(self, task: Task) -> Task | None:
        """End a task queued in Redis at once (None when it is not queued there); 409
        ``task_started`` when a node claimed it meanwhile."""
        if self.cluster is None:
            return None
        now = self._reactor.seconds()
        reason = "cancelled by request"
        if not await self.cluster.backend.end_queued(task.id, "cancelled", reason, now):
            raise Refused(409, "task_started",
                          f"task {task.id} left the queue meanwhile; cancel it again")
        task.state, task.reason, task.finished_at = TaskState.CANCELLED, reason, now
        return task

    async def _free_key(self, key: str, task_id: str) -> None:
        """The submit that held ``key`` took nothing: the next submit with it makes a
        task (else it would name ``task_id``, which no node has or ever will)."""
        assert self.cluster is not None
        try:
            await self.cluster.backend.release_key(key, task_id)
        except QueueUnavailable as error:
            self.log.warn("Idempotency-Key of refused task {task_id} not freed: {error}",
                          task_id=task_id, error=error)

    async def known(self, task_id: str, request: TaskRequest) -> Routed:
        """The task an earlier submit made (same Idempotency-Key), from any node."""
        owner = await self.locate_owner(task_id)
        if owner is not None and self.peers is not None:
            try:
                reply = await self.peers.request(owner, b"GET", f"/task/{task_id}".encode(),
                                                 timeout=self._settings.peer_timeout)
            except PeerUnavailable:
                pass
            else:
                if reply.status == 200:
                    return Relayed(reply)
        found = await self.find(task_id)
        if found is None:
            # Its first submit is still on its way: the id is all that is known yet.
            return Admitted(self._tasks.new_task(request, task_id=task_id))
        return Admitted(found[0])

    # -- placement ----------------------------------------------------------------------

    def _new_id(self, node_id: str) -> str:
        """An id for a task sent to ``node_id``: given before the send, naming the node
        that will run it (owner routing), so a lost reply can still say which task."""
        return new_task_id(self._reactor.seconds(), node_id)

    async def _place(self, request: TaskRequest, body: dict[str, Any], wait: float | None,
                     key: str | None = None, queueable: bool = False,
                     task_id: str | None = None) -> Routed:
        """As leader: try nodes best first; a node that refuses (429/503) is skipped.

        A node that may have received the task but did not answer ends the placement:
        without Redis nothing else would stop a second run, so the client gets 503 with
        the id to look up. In a Redis cluster every start claims the id first."""
        assert self._placement is not None
        refusals = []
        for node_id in self._placement.choose(request.labels, resources=request.resources):
            if node_id == self._node_id:
                try:
                    if task_id is not None:
                        return await self._start_claimed(request, task_id)
                    return await self._run_here(request, key=key)
                except (CapacityError, Refused) as error:
                    if error.status not in (429, 503):
                        raise
                    refusals.append(f"{node_id}: {error.message}")
                    continue
            sent_id = task_id if task_id is not None else self._new_id(node_id)
            run = RunBody(body, self._elector.token, sent_id, idempotency_key=key, wait=wait)
            try:
                reply = await self._ask(node_id, RUN_PATH, run.to_json(), wait)
            except PeerUnavailable as error:
                if error.sent and task_id is None:
                    raise Refused(503, "placement_unknown",
                                  f"task {sent_id} was sent to node {node_id}, which did not "
                                  f"answer ({error}): it may be running there, so it is not "
                                  f"started anywhere else; look it up with GET /task/"
                                  f"{sent_id}", 5) from None
                refusals.append(f"{node_id}: {error}")
                continue
            if reply.status in (429, 503):
                refusals.append(f"{node_id}: busy ({reply.status})")
                continue
            if reply.status == 409 and b"stale_leader_token" in reply.body:
                # A newer leader exists: this node must not place; the client asks again.
                raise Refused(503, "leader_changed",
                              "this node no longer leads the cluster; try again", 1)
            if reply.status == 202:  # still running there: count it until announced
                self._placement.placed(node_id)
            return Relayed(reply)
        if self.cluster is not None and task_id is not None:
            return await self._enqueue(request, body, task_id, key)
        labels = request.labels
        local = self._settings.labels
        if queueable and all(local.get(k) == v for k, v in labels.items()):
            return await self._run_here(request, key=key, queueable=True)
        detail = "; ".join(refusals) or f"no healthy node has the labels {dict(labels)}"
        raise Refused(429, "no_capacity", f"no node can take the task now ({detail})", 1)

    async def place_retry(self, record: dict[str, Any]) -> dict[str, Any]:
        """Run a lost task again, as a new attempt, on the best node but the one it left
        (``Recovery``'s retry); the task JSON of the new attempt."""
        assert self._placement is not None
        fields = {name: record[name] for name in ("command", "args", "cwd", "env", "timeout",
                                                   "idle_timeout", "labels")}
        fields["retries"] = int(record["retries"]) - 1
        fields["tty"] = bool(record.get("tty", False))
        fields.update({name: record[name] for name in ("workspace", "artifacts", "source",
                                                       "fanout", "resources")
                       if record.get(name)})
        request = self._parse(fields)
        attempt = int(record.get("attempt") or 1) + 1
        for node_id in self._placement.choose(request.labels, exclude=[record["node_id"]],
                                              resources=request.resources):
            if node_id == self._node_id:
                try:
                    task = await self.scheduler.submit(request, queueable=False,
                                                       attempt=attempt, retry_of=record["id"])
                except CapacityError:
                    continue
                return task.to_json()
            run = RunBody(fields, self._elector.token, self._new_id(node_id), attempt,
                          record["id"])
            try:
                reply = await self._ask(node_id, RUN_PATH, run.to_json(), None)
            except PeerUnavailable as error:
                if error.sent:
                    raise RuntimeError(f"node {node_id} did not answer the retry of task "
                                       f"{record['id']}; not tried elsewhere") from None
                continue
            if reply.status in (200, 202):
                self._placement.placed(node_id)
                answer: dict[str, Any] = json.loads(reply.body)
                return answer
        raise RuntimeError(f"no node could take the retry of task {record['id']}")

    # -- here ---------------------------------------------------------------------------

    def _parse(self, fields: dict[str, Any]) -> TaskRequest:
        try:
            return parse_task_request(fields, self._settings.max_timeout)
        except RequestError as error:
            raise Refused(400, "bad_request", str(error)) from None

    async def _run_here(self, request: TaskRequest, attempt: int = 1,
                        retry_of: str | None = None, key: str | None = None,
                        queueable: bool = False, task_id: str | None = None) -> Admitted:
        try:
            task = await self.scheduler.submit(request, idempotency_key=key,
                                               queueable=queueable, attempt=attempt,
                                               retry_of=retry_of, task_id=task_id)
        except SeenTask as error:
            raise Refused(409, "already_admitted", str(error)) from None
        if self._directory is not None:
            await self._directory.recorded(task.id)
        return Admitted(task)

    async def _send_run(self, request: TaskRequest, node_id: str, body: dict[str, Any],
                        wait: float | None, key: str | None, task_id: str) -> Routed:
        """A task pinned to ``node_id``: it runs there or is refused, never elsewhere.

        When the node did not answer, it may have started the task. In a Redis cluster
        every start claims the id first, so retiring the id settles it: either the node
        claimed it (the task is found there) or it never can (a refusal that took
        nothing, ``node_unreachable``). Without Redis the answer stays ambiguous
        (``node_unavailable``: look the task up before submitting again)."""
        run = RunBody(body, None, task_id, idempotency_key=key, wait=wait)
        try:
            return Relayed(await self._ask(node_id, RUN_PATH, run.to_json(), wait))
        except PeerUnavailable as error:
            if not error.sent:
                raise Refused(503, "node_unreachable", f"{error}; task {task_id} was not "
                              "started", 1) from None
            if self.cluster is None:
                raise Refused(503, "node_unavailable", f"{error} (task {task_id})",
                              1) from None
            reason = (f"node {node_id} did not answer its start ({error}); the task was "
                      "not started anywhere and never will be")
            claimed = await self.cluster.backend.retire(
                task_id, self._record(request, body, task_id, key), reason,
                self._reactor.seconds())
            if claimed is None:
                raise Refused(503, "node_unreachable", f"{reason} (task {task_id})",
                              1) from None
            return await self.known(task_id, request)  # it started there after all

    async def _ask(self, node_id: str, path: bytes, body: dict[str, Any],
                   wait: float | None) -> PeerReply:
        if self.peers is None:
            raise PeerUnavailable(f"node {node_id} is not reachable")
        return await self.peers.request(
            node_id, b"POST", path, json.dumps(body, separators=(",", ":")).encode(),
            {b"Content-Type": b"application/json"},
            timeout=(wait or 0) + self._settings.peer_timeout)

    def recorded(self, task_id: str) -> defer.Deferred[Any]:
        """Fires once a started task is in the cluster's directory (at once without one)."""
        if self._directory is None:
            return defer.succeed(None)
        return self._directory.recorded(task_id)

    # -- where is task X --------------------------------------------------------------

    def record_task(self, record: Mapping[str, Any]) -> Task:
        """The task JSON of a record kept in the cluster queue."""
        request = parse_task_request(dict(record["request"]), self._settings.max_timeout)
        task: Task = self._tasks.new_task(request, task_id=str(record["id"]))
        task.node_id = str(record.get("entered_on") or task.node_id)
        task.created_at = float(record.get("created_at") or task.created_at)
        task.queue_timeout = record.get("queue_timeout")
        return task

    async def find(self, task_id: str) -> tuple[Task, int | None] | None:
        """A task of this node, or one queued in Redis (with its position there)."""
        task = await self.scheduler.find(task_id)
        if task is not None:
            return task, None
        queued = await self._cluster_task(task_id)
        if queued is None:
            task = self.scheduler.live_task(task_id)  # claimed here while Redis was read
            return None if task is None else (task, None)
        return queued

    async def _cluster_task(self, task_id: str) -> tuple[Task, int | None] | None:
        """A task queued in Redis (or ended there while queued), with its position."""
        if self.cluster is None:
            return None
        entry = await self.cluster.backend.where(task_id)
        if entry is None:
            # Queued here, and Redis lost it (restart without its data): the watch
            # settles it; until then it is queued as far as anyone can tell.
            record = self.cluster.watch.record(task_id)
            return None if record is None else (self.record_task(record), None)
        if entry.record is None or entry.state == "started":
            return None
        task = self.record_task(entry.record)
        task.state = TaskState(entry.state) if entry.state in {s.value for s in TaskState} \
            else TaskState.QUEUED
        task.reason = entry.reason
        task.finished_at = entry.finished_at
        position = None
        if task.state is TaskState.QUEUED:
            position = await self.cluster.backend.position(task_id)
        return task, position

    async def locate_owner(self, task_id: str) -> str | None:
        """The node that runs ``task_id`` when it is another known node, else None. In a
        Redis cluster the node that claimed the id runs it, whichever node the id names
        (the WebSocket's attach asks this too)."""
        owner = owner_of(task_id)
        if owner is None or owner == self._node_id or self.peers is None \
                or not self.peers.knows(owner):
            owner = None
        if self.scheduler.live_task(task_id) is not None:
            return None  # queued or running here (whichever node its id names)
        if self.cluster is None:
            return owner
        try:
            entry = await self.cluster.backend.where(task_id)
        except QueueUnavailable:
            return owner  # the id names where it entered: ask there
        if entry is None:
            return await self._locate(task_id, owner)
        if entry.node is None or entry.node == self._node_id:
            return None  # queued or ended in Redis, or ours: answered here
        if self.peers is not None and self.peers.knows(entry.node):
            return entry.node
        return owner

    async def _locate(self, task_id: str, owner: str | None) -> str | None:
        """Redis has no record of the id (it lost its data, or the id is unknown): ask this
        node's store, then every node it knows, and write the claim back when found."""
        assert self.cluster is not None
        if await self.scheduler.find(task_id) is not None \
                or self.cluster.watch.record(task_id) is not None:
            return None
        try:
            holder = await self.cluster.locator.locate(task_id)
        except LookupError:
            return owner
        if holder is None or holder == self._node_id:
            return None
        try:
            await self.cluster.backend.claim(task_id, holder)
        except QueueUnavailable:
            pass  # found all the same; the next lookup asks again
        return holder

    @property
    def can_fan_out(self) -> bool:
        return self.peers is not None and self._membership is not None

    async def peer_tasks(self, path: bytes) -> PeerPage:
        """The same page of ``/tasks`` from every node we can ask.

        Asked: healthy peers and nodes known only by gossip. Every other known node (silent,
        dead, departed) and every node that did not answer is listed as unreachable: its
        tasks are missing from the page.
        """
        assert self.peers is not None and self._membership is not None
        membership = self._membership
        asked = [peer.node_id for peer in membership.healthy()]
        asked += [rumour.node_id for rumour in membership.rumours()
                  if rumour.node_id not in asked]
        unreachable = [peer.node_id for peer in membership.peers()
                       if peer.node_id not in asked]
        replies = await defer.DeferredList(
            [defer.Deferred.fromCoroutine(self.peers.request(
                node_id, b"GET", path, timeout=self._settings.peer_timeout))
             for node_id in asked], consumeErrors=True)
        tasks: list[dict[str, Any]] = []
        for node_id, (ok, reply) in zip(asked, replies, strict=True):
            if ok and reply.status == 200:
                tasks.extend(json.loads(reply.body)["tasks"])
            else:
                unreachable.append(node_id)
        return PeerPage(tasks, sorted(unreachable))

    async def lost_elsewhere(self, task_id: str) -> dict[str, Any] | None:
        """The leader's lost record of a task whose owner is down, if there is one."""
        if self._directory is None:
            return None
        try:
            record = await self._directory.lost(task_id)
        except Exception:
            return None
        if record is None:
            return None
        return {k: v for k, v in record.items() if k not in ("env", "secret_env_keys")}

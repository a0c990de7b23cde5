"""Live task output and cluster events over WebSocket (``/ws``, same port as the HTTP API).

Authentication happens at the handshake, as for HTTP: ``X-Cluster-Secret: S`` or
``Authorization: Bearer S``. Browsers cannot set headers on a WebSocket, so they offer two
subprotocols: ``oxide.v1`` and ``oxide.token.<base64url(S) without padding>``; the server
answers with ``oxide.v1`` and never echoes the token (a ``?token=`` query was not chosen:
URLs end up in proxy and access logs). Anything else is refused with HTTP 401.

Client → server, JSON text frames (at most 64 KiB)::

    {"op": "attach", "task": ID, "offset": N}      offset optional, default 0
    {"op": "detach", "task": ID}
    {"op": "subscribe", "topic": "cluster"}

Server → client, JSON text frames::

    {"type": "attached", "task": ID, "offset": N, "state": S}
    {"type": "output", "task": ID, "offset": N, "stream": "stdout"|"stderr",
     "encoding": "utf-8"|"base64", "data": STRING}
    {"type": "live", "task": ID, "offset": N}       replay done, now streaming live
    {"type": "state", "task": ID, "state": S, "exit_code": C, "signal": N, "reason": R,
     "output_bytes": B[, "usage": U]}               the task ended; the attachment is gone
    {"type": "detached", "task": ID}
    {"type": "task", "event": "started"|"finished", "task": {task JSON}}   topic cluster
    {"type": "node"|"leader", ...}                  topic cluster, see :meth:`LiveHub.publish`
    {"type": "error", "message": M, "task": ID?}

Output offsets are byte offsets into the task's combined output; ``data`` is the chunk as
text when the chunk is valid UTF-8, else base64 (``encoding`` says which), so any bytes
survive. Every output message starts exactly where the previous one for that task ended:
a client that reconnects resumes with ``offset`` = last offset + its byte length.

Replay and live output meet without gap or duplicate because the store's queue is FIFO:
an attachment registers for live chunks *before* it queues a store read, so every chunk is
either in the read (its write was queued earlier) or arrives live afterwards; overlaps are
cut by offset. A slow client is never buffered without bound: when the transport pushes
back, live chunks are not queued in memory, the attachment falls back to reading the store
at the client's pace (the output is there anyway) and goes live again once caught up. Only
what cannot be re-read (events, replies) is queued while paused; past
``max_pending`` bytes the client is dropped with close code 4001 ("slow consumer").
Malformed frames get an ``error`` reply; after ``MAX_BAD_FRAMES`` the connection is closed
with 1008 (policy violation). The server pings every ``PING_INTERVAL`` seconds.
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import attrs
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from oxide_cluster.model import Task, TaskState, owner_of

SUBPROTOCOL = "oxide.v1"
TOKEN_PREFIX = "oxide.token."
MAX_BAD_FRAMES = 10
MAX_FRAME = 64 * 1024
# Output bytes per message: base64 (4/3) plus JSON framing stays under MAX_FRAME.
MAX_OUTPUT_PIECE = 32 * 1024
MAX_ATTACHMENTS = 64
PING_INTERVAL = 10.0
PING_TIMEOUT = 30.0
CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001
CLOSE_SLOW_CONSUMER = 4001

log = Logger()


class CommandError(ValueError):
    """A client frame that is not a valid command; the message says why."""


@attrs.frozen
class Command:
    op: str
    task: str | None = None
    offset: int = 0
    topic: str | None = None


def parse_command(payload: bytes, is_binary: bool) -> Command:
    """The one parser of client frames; rejects anything unexpected with a precise reason."""
    if is_binary:
        raise CommandError("binary frames are not accepted; send JSON text")
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise CommandError("frame is not valid JSON") from None
    except RecursionError:
        raise CommandError("frame is nested too deeply") from None
    if not isinstance(body, dict):
        raise CommandError("frame must be a JSON object")
    op = body.get("op")
    fields = {"attach": {"op", "task", "offset"}, "detach": {"op", "task"},
              "subscribe": {"op", "topic"}}
    if not isinstance(op, str) or op not in fields:
        raise CommandError(f"unknown op {op!r}; expected attach, detach or subscribe")
    unknown = sorted(set(body) - fields[op])
    if unknown:
        raise CommandError(f"{op}: unknown field {unknown[0]!r}")
    if op == "subscribe":
        if body.get("topic") != "cluster":
            raise CommandError("subscribe: topic must be 'cluster'")
        return Command(op, topic="cluster")
    task = body.get("task")
    if not isinstance(task, str) or not task or len(task) > 200:
        raise CommandError(f"{op}: task must be a task id string")
    offset = body.get("offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**62:
        raise CommandError(f"{op}: offset must be a whole number >= 0")
    return Command(op, task=task, offset=offset)


def output_message(task_id: str, offset: int, stream: str, data: bytes) -> dict[str, Any]:
    """An output chunk as JSON: text when it is valid UTF-8, base64 otherwise."""
    try:
        text, encoding = data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(data).decode("ascii"), "base64"
    return {"type": "output", "task": task_id, "offset": offset, "stream": stream,
            "encoding": encoding, "data": text}


def output_messages(task_id: str, offset: int, stream: str,
                    data: bytes) -> list[dict[str, Any]]:
    """A chunk as messages of at most ``MAX_OUTPUT_PIECE`` bytes each, so a frame stays
    under the WebSocket payload limit even base64-encoded."""
    return [output_message(task_id, offset + start, stream, data[start:start + MAX_OUTPUT_PIECE])
            for start in range(0, len(data), MAX_OUTPUT_PIECE)]


def state_message(task: Task) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "state", "task": task.id, "state": task.state.value,
        "exit_code": task.exit_code, "signal": task.signal, "reason": task.reason,
        "output_bytes": task.output_bytes}
    if task.usage is not None:  # the CLI's end-of-run line
        message["usage"] = task.usage
    return message


class Sink(Protocol):
    """What a session needs from its connection (the Autobahn protocol, or a test fake)."""

    @property
    def paused(self) -> bool: ...

    def send_text(self, payload: bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class Attachment:
    """One client following one task: replay from the store, then live, no gap, no dup."""

    def __init__(self, hub: LiveHub, session: LiveSession, task_id: str, offset: int) -> None:
        self._hub = hub
        self._session = session
        self.task_id = task_id
        self.sent = offset  # the next byte offset the client expects
        self.live = False
        self._reading = False
        self._buffer: list[tuple[int, str, bytes]] = []
        self._buffered = 0
        self._overflowed = False
        self._announced = False
        self.ended: Task | None = None
        self.closed = False

    def start(self) -> None:
        task = self._hub.executor.live_task(self.task_id)
        if task is not None:
            self._session.send({"type": "attached", "task": self.task_id,
                                "offset": self.sent, "state": task.state.value})
            self._read()
            return
        found = self._hub.store.get_task(self.task_id)
        found.addCallback(self._found).addErrback(self._failed)

    def _found(self, task: Task | None) -> None:
        if self.closed:
            return
        if task is None:
            self._session.error(f"no task {self.task_id!r} on this node", self.task_id)
            self.stop()
            return
        self._session.send({"type": "attached", "task": self.task_id, "offset": self.sent,
                            "state": task.state.value})
        # Not running here: whatever output exists is in the store already. A queued
        # task has none yet; its start and end reach us through the state listeners.
        if task.state is not TaskState.QUEUED:
            self.ended = task
        self._read()

    def _failed(self, failure: Failure) -> None:
        log.failure("replay of task {task_id} failed", failure, task_id=self.task_id)
        if not self.closed:
            self._session.error("cannot read the task's output (logged)", self.task_id)
            self.stop()

    def _read(self) -> None:
        """Queue a store read from ``sent``; chunks arriving meanwhile are buffered."""
        if self.closed or self._reading or self._session.paused:
            return  # a paused session calls resume() later
        self._reading = True
        self._buffer, self._buffered, self._overflowed = [], 0, False
        reading = self._hub.store.read_output(self.task_id, self.sent, self._hub.read_size)
        reading.addCallback(self._replayed).addErrback(self._failed)

    def _replayed(self, chunks: list[tuple[int, str, bytes]]) -> None:
        self._reading = False
        if self.closed:
            return
        total = 0
        for start, stream, data in chunks:
            total += len(data)
            self._emit(start, stream, data)
        if total >= self._hub.read_size or self._overflowed:
            self._read()  # more in the store than one read returns
            return
        # Everything queued before the read was in it; the buffer holds what came after.
        buffered, self._buffer, self._buffered = self._buffer, [], 0
        for start, stream, data in buffered:
            self._emit(start, stream, data)
        self.live = True
        if not self._announced:
            self._announced = True
            self._session.send({"type": "live", "task": self.task_id, "offset": self.sent})
        if self.ended is not None:
            self._end()

    def resume(self) -> None:
        if not self.live:
            self._read()

    def live_chunk(self, offset: int, stream: str, data: bytes) -> None:
        if self.closed:
            return
        if self.live and self._session.paused:
            self.live = False  # the store has this chunk: catch up at the client's pace
        if self.live:
            self._emit(offset, stream, data)
        elif self._reading and not self._overflowed:
            self._buffered += len(data)
            if self._buffered > self._hub.live_buffer:
                # Read again afterwards instead of holding more in memory.
                self._overflowed, self._buffer, self._buffered = True, [], 0
            else:
                self._buffer.append((offset, stream, data))
        # Not reading (paused): the next read will find this chunk in the store.

    def task_ended(self, task: Task) -> None:
        self.ended = task
        if self.live:
            self._end()

    def _emit(self, start: int, stream: str, data: bytes) -> None:
        end = start + len(data)
        if end <= self.sent:
            return
        if start > self.sent:
            log.warn("task {task_id} output has a gap at {offset} (store write failed?)",
                     task_id=self.task_id, offset=self.sent)
        elif start < self.sent:
            data = data[self.sent - start:]
            start = self.sent
        for message in output_messages(self.task_id, start, stream, data):
            self._session.send(message)
        self.sent = end

    def _end(self) -> None:
        assert self.ended is not None
        self._session.send(state_message(self.ended))
        self.stop()

    def stop(self) -> None:
        self.closed = True
        self._buffer = []
        self._hub._remove(self)
        self._session.attachments.pop(self.task_id, None)


class RemoteAttachment:
    """Follows a task that another node owns, by long-polling the owner's output.

    ``GET /task/{id}/output?format=json&offset=N&wait=S`` on the owner answers as soon as
    output past N exists or the task ends, so a client attached here sees the same
    messages, offsets and end as on the owner, a request round trip later. The owner's
    store is the stream both read; this node keeps nothing.
    """

    POLL_WAIT = 25
    RETRIES = 5

    def __init__(self, hub: LiveHub, session: LiveSession, task_id: str, offset: int,
                 owner: str) -> None:
        self._hub = hub
        self._session = session
        self.task_id = task_id
        self.sent = offset
        self._owner = owner
        self._polling = False
        self._announced = False
        self._failures = 0
        self.closed = False
        self.live = False

    def start(self) -> None:
        self._poll()

    def resume(self) -> None:
        self._poll()

    def live_chunk(self, offset: int, stream: str, data: bytes) -> None:
        """Never called for a remote task: its output arrives by polling."""

    def task_ended(self, task: Task) -> None:
        """Never called for a remote task: the owner reports the end."""

    def _poll(self) -> None:
        if self.closed or self._polling or self._session.paused:
            return
        self._polling = True
        wait = 0 if not self._announced else self.POLL_WAIT
        path = (f"/task/{self.task_id}/output?format=json&offset={self.sent}&wait={wait}")
        asked = defer.Deferred.fromCoroutine(self._hub.peers.request(
            self._owner, b"GET", path.encode(), timeout=self.POLL_WAIT + 15))
        asked.addCallbacks(self._answered, self._unreachable)
        asked.addErrback(self._failed)

    def _answered(self, reply: Any) -> None:
        self._polling = False
        if self.closed:
            return
        if reply.status != 200:
            message = f"owner {self._owner} answered {reply.status} for task {self.task_id}"
            with_body = json.loads(reply.body).get("error", {}).get("message", message) \
                if reply.body.startswith(b"{") else message
            self._session.error(with_body, self.task_id)
            self.stop()
            return
        self._failures = 0
        body = json.loads(reply.body)
        if not self._announced:
            self._announced = True
            self._session.send({"type": "attached", "task": self.task_id, "offset": self.sent,
                                "state": body["state"], "owner": self._owner})
        for message in body["chunks"]:
            if message["offset"] >= self.sent:
                self._session.send(message)
        self.sent = max(self.sent, int(body["next_offset"]))
        caught_up = self.sent >= int(body["output_bytes"])
        if body["state"] in TERMINAL_STATE_NAMES and caught_up:
            self._finish()
            return
        if caught_up and not self.live:
            self.live = True
            self._session.send({"type": "live", "task": self.task_id, "offset": self.sent})
        self._poll()

    def _finish(self) -> None:
        asked = defer.Deferred.fromCoroutine(self._hub.peers.request(
            self._owner, b"GET", f"/task/{self.task_id}".encode()))

        def ended(reply: Any) -> None:
            if self.closed:
                return
            task = json.loads(reply.body)
            self._session.send({"type": "state", "task": self.task_id,
                                "state": task["state"], "exit_code": task["exit_code"],
                                "signal": task["signal"], "reason": task["reason"],
                                "output_bytes": task["output_bytes"]})
            self.stop()
        asked.addCallbacks(ended, self._unreachable).addErrback(self._failed)

    def _unreachable(self, failure: Failure) -> None:
        self._polling = False
        if self.closed:
            return
        self._failures += 1
        if self._failures > self.RETRIES:
            self._session.error(f"owner node {self._owner} of task {self.task_id} is not "
                                f"reachable: {failure.getErrorMessage()}", self.task_id)
            self.stop()
            return
        self._hub.reactor.callLater(0.5 * self._failures, self._poll)

    def _failed(self, failure: Failure) -> None:
        log.failure("following remote task {task_id} failed", failure, task_id=self.task_id)
        if not self.closed:
            self._session.error("cannot follow the task (logged)", self.task_id)
            self.stop()

    def stop(self) -> None:
        self.closed = True
        self._hub._remove(self)
        self._session.attachments.pop(self.task_id, None)


class _Locating:
    """Holds an attach's place while the node running its task is looked up."""

    def __init__(self, session: LiveSession, task_id: str) -> None:
        self._session = session
        self.task_id = task_id
        self.closed = False

    def resume(self) -> None:
        pass

    def stop(self) -> None:
        self.closed = True
        self._session.attachments.pop(self.task_id, None)


TERMINAL_STATE_NAMES = frozenset(state.value for state in TaskState if state.terminal)


class LiveSession:
    """One WebSocket connection's commands, attachments and subscriptions."""

    def __init__(self, hub: LiveHub, sink: Sink, max_pending: int) -> None:
        self._hub = hub
        self._sink = sink
        self._max_pending = max_pending
        self._pending = 0  # bytes handed to a paused transport
        self.attachments: dict[str, Attachment | RemoteAttachment | _Locating] = {}
        self.subscribed = False
        self.bad_frames = 0
        self.closed = False

    @property
    def paused(self) -> bool:
        return self._sink.paused

    def received(self, payload: bytes, is_binary: bool) -> None:
        try:
            command = parse_command(payload, is_binary)
        except CommandError as error:
            self.bad_frames += 1
            self.error(str(error))
            if self.bad_frames >= MAX_BAD_FRAMES and not self.closed:
                self.close(CLOSE_POLICY, f"{self.bad_frames} malformed frames")
            return
        assert command.task is not None or command.op == "subscribe"
        if command.op == "subscribe":
            self.subscribed = True
            self.send({"type": "subscribed", "topic": "cluster"})
        elif command.op == "attach":
            self._attach(command.task or "", command.offset)
        else:
            attachment = self.attachments.get(command.task or "")
            if attachment is None:
                self.error(f"not attached to task {command.task!r}", command.task)
            else:
                attachment.stop()
                self.send({"type": "detached", "task": command.task})

    def _attach(self, task_id: str, offset: int) -> None:
        if task_id in self.attachments:
            self.error(f"already attached to task {task_id!r}", task_id)
        elif len(self.attachments) >= MAX_ATTACHMENTS:
            self.error(f"at most {MAX_ATTACHMENTS} attachments per connection", task_id)
        elif self._hub.locate is None:
            self._attach_to(task_id, offset, self._hub.remote_owner(task_id))
        else:
            # Where the task runs may need a look-up (a Redis cluster's claim): attach
            # once it is known; meanwhile a second attach is refused as a duplicate.
            locating = _Locating(self, task_id)
            self.attachments[task_id] = locating

            def attach(owner: str | None) -> None:
                if not locating.closed:
                    locating.stop()
                    self._attach_to(task_id, offset, owner)

            def failed(failure: Failure) -> None:
                if not locating.closed:
                    locating.stop()
                    self.error(f"cannot find where task {task_id!r} runs: "
                               f"{failure.getErrorMessage()}", task_id)
            defer.ensureDeferred(self._hub.locate(task_id)).addCallbacks(attach, failed)

    def _attach_to(self, task_id: str, offset: int, owner: str | None) -> None:
        attachment: Attachment | RemoteAttachment
        if owner is not None:
            attachment = RemoteAttachment(self._hub, self, task_id, offset, owner)
        else:
            attachment = Attachment(self._hub, self, task_id, offset)
        self.attachments[task_id] = attachment
        self._hub._add(attachment)  # before the store read: see the module docstring
        attachment.start()

    def error(self, message: str, task_id: str | None = None) -> None:
        body: dict[str, Any] = {"type": "error", "message": message}
        if task_id is not None:
            body["task"] = task_id
        self.send(body)

    def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
        if self._sink.paused:
            self._pending += len(payload)
            if self._pending > self._max_pending:
                self.close(CLOSE_SLOW_CONSUMER,
                           f"slow consumer: over {self._max_pending} bytes queued")
                return
        self._sink.send_text(payload)

    def resumed(self) -> None:
        self._pending = 0
        for attachment in list(self.attachments.values()):
            attachment.resume()

    def close(self, code: int, reason: str) -> None:
        self.closed = True
        self.detach_all()
        self._sink.close(code, reason)

    def detach_all(self) -> None:
        self.closed = True
        for attachment in list(self.attachments.values()):
            attachment.stop()
        self._hub._sessions.discard(self)


class LiveHub(service.Service):
    """Registers once on the executor's listeners and fans output and events out."""

    def __init__(self, executor: Any, store: Any, *, read_size: int = 1024 * 1024,
                 live_buffer: int = 4 * 1024 * 1024,
                 max_pending: int = 16 * 1024 * 1024, peers: Any = None,
                 locate: Callable[[str], Coroutine[Any, Any, str | None]] | None = None,
                 node_id: str | None = None, reactor: Any = None) -> None:
        self.executor = executor
        self.store = store
        self.read_size = read_size
        self.live_buffer = live_buffer
        self.max_pending = max_pending
        self._attached: dict[str, set[Attachment | RemoteAttachment]] = {}
        self._sessions: set[LiveSession] = set()
        # With peers, tasks other nodes own are followed there.
        self.peers = peers
        # In a Redis cluster, where a task runs (None: here) may take a look-up
        # (``TaskRouter.locate_owner``): an id names the node it entered.
        self.locate = locate
        self.node_id = node_id
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        self.executor.output_listeners.append(self._on_output)
        self.executor.state_listeners.append(self._on_state)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        for listeners, listener in ((self.executor.output_listeners, self._on_output),
                                    (self.executor.state_listeners, self._on_state)):
            if listener in listeners:
                listeners.remove(listener)
        for session in list(self._sessions):
            session.close(CLOSE_GOING_AWAY, "the agent is stopping")
        return defer.succeed(None)

    @property
    def client_count(self) -> int:
        """Open WebSocket connections (the ``oxide_websocket_clients`` gauge)."""
        return len(self._sessions)

    def open_session(self, sink: Sink) -> LiveSession:
        session = LiveSession(self, sink, self.max_pending)
        self._sessions.add(session)
        return session

    def publish(self, event: dict[str, Any]) -> None:
        """Send a cluster event (``{"type": "node"|"leader"|"task", ...}``) to subscribers."""
        for session in list(self._sessions):
            if session.subscribed:
                session.send(event)

    def remote_owner(self, task_id: str) -> str | None:
        owner = owner_of(task_id)
        if owner is None or owner == self.node_id or self.peers is None \
                or not self.peers.knows(owner):
            return None
        return owner

    def _add(self, attachment: Attachment | RemoteAttachment) -> None:
        self._attached.setdefault(attachment.task_id, set()).add(attachment)

    def _remove(self, attachment: Attachment | RemoteAttachment) -> None:
        attached = self._attached.get(attachment.task_id)
        if attached is not None:
            attached.discard(attachment)
            if not attached:
                del self._attached[attachment.task_id]

    def _on_output(self, task: Task, offset: int, stream: str, data: bytes) -> None:
        for attachment in list(self._attached.get(task.id, ())):
            attachment.live_chunk(offset, stream, data)

    def _on_state(self, task: Task) -> None:
        if task.state.terminal:
            for attachment in list(self._attached.get(task.id, ())):
                attachment.task_ended(task)
        event = "started" if task.state is TaskState.RUNNING else "finished"
        self.publish({"type": "task", "event": event, "task": task.to_json()})


def authorized(headers: dict[str, str], protocols: list[str], secret: bytes) -> bool:
    """True when the handshake carries the secret in a header or a token subprotocol."""
    supplied: bytes | None = None
    if "x-cluster-secret" in headers:
        supplied = headers["x-cluster-secret"].encode()
    elif "authorization" in headers:
        scheme, _, token = headers["authorization"].partition(" ")
        if scheme.lower() == "bearer":
            supplied = token.strip().encode()
    else:
        for offered in protocols:
            if offered.startswith(TOKEN_PREFIX):
                encoded = offered[len(TOKEN_PREFIX):]
                try:
                    supplied = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
                except ValueError:
                    supplied = None
    return supplied is not None and hmac.compare_digest(supplied, secret)


@implementer(IPushProducer)
class _Backpressure:
    """Follows the TCP transport's buffer: paused while it is over its high-water mark."""

    def __init__(self, on_resume: Callable[[], None]) -> None:
        self.paused = False
        self._on_resume = on_resume

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._on_resume()

    def stopProducing(self) -> None:
        self.paused = True


class LiveProtocol(WebSocketServerProtocol):
    """Thin: authenticates the handshake, hands frames to a :class:`LiveSession`."""

    factory: LiveFactory
    session: LiveSession | None = None
    _backpressure: _Backpressure | None = None

    @property
    def paused(self) -> bool:
        return self._backpressure is not None and self._backpressure.paused

    def onConnect(self, request: ConnectionRequest) -> str | None:
        if not authorized(request.headers, request.protocols, self.factory.secret):
            raise ConnectionDeny(401, "missing or wrong cluster secret")
        return SUBPROTOCOL if SUBPROTOCOL in request.protocols else None

    def onOpen(self) -> None:
        self.session = self.factory.hub.open_session(self)
        self._backpressure = _Backpressure(self._resumed)
        transport: Any = self.transport
        # The HTTP channel registered itself before the upgrade; the socket is ours now.
        transport.unregisterProducer()
        transport.registerProducer(self._backpressure, True)

    def _resumed(self) -> None:
        if self.session is not None:
            self.session.resumed()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is not None:
            self.session.received(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.session is not None:
            self.session.detach_all()
            self.session = None

    def send_text(self, payload: bytes) -> None:
        self.sendMessage(payload, isBinary=False)

    def close(self, code: int, reason: str) -> None:
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:120])


class LiveFactory(WebSocketServerFactory):
    """The WebSocket side of one node."""

    protocol = LiveProtocol  # type: ignore[assignment]

    def __init__(self, hub: LiveHub, secret: str, reactor: Any) -> None:
        super().__init__(reactor=reactor)
        self.hub = hub
        self.secret = secret.encode()
        self.setProtocolOptions(autoPingInterval=PING_INTERVAL, autoPingTimeout=PING_TIMEOUT,
                                maxMessagePayloadSize=MAX_FRAME,
                                maxFramePayloadSize=MAX_FRAME)

    def web_resource(self) -> WebSocketResource:
        return WebSocketResource(self)

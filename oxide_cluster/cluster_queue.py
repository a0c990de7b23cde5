"""The queue of a Redis cluster: queued tasks live in Redis, the leader dispatches them.

Where a request enters, the node gives the task its id (``<ms><random>-<entering node>``)
before any forward. When no node can start it now, the task's record is written to Redis
in one atomic script: the hash ``oxide:{cluster}:task:{id}`` (``state`` ``queued``,
``seq``, ``record``: the request without ``secret_env``, its priority, group, creation
time, queue timeout, idempotency key) and the sorted set ``oxide:{cluster}:queue``
(id scored by ``seq``, from ``INCR oxide:{cluster}:queue:seq``). Nothing about a queued
task lives only in one process. The same scripts keep an index for ``GET /queue``: per
priority, the sorted set of its groups scored by each group's oldest ``seq``
(``queue:p:{priority}:groups``) and each group's ids by ``seq`` (``queue:p:{priority}:g:{group}``),
and the depth by priority (the hash ``queue:depth``), so a page of the listing reads only
what it shows (see :func:`list_queue`).

The leader polls the sorted set for entries past the last ``seq`` it saw (one cheap
script per poll, nothing when idle), keeps them in a :class:`FairQueue` (priority, group
turns, FIFO: the standalone order), and sends the next task to a node with room over the
internal route ``POST /internal/dispatch`` with its fencing token. A new leader reads the
whole set once, then follows it the same way; the turn of the groups restarts.

Exactly once: every node, before it starts a task with an id given by another node,
*claims* the id in the same hash (``state`` → ``started``, ``node`` → itself) with a
script that succeeds only while the task is unknown or ``queued``. A second dispatch, a
placement by a deposed leader, or a submit a follower queued after its forward to the
leader timed out all meet a claimed id and are refused (409 ``already_admitted``). The
claim also says where a task runs, so ``GET /task/{id}`` finds it from any node.

Redis failing on a request path raises :class:`QueueUnavailable` (the API answers 503
``queue_unavailable``); nothing is then started or queued on a guess. Redis losing its data
(a restart without its append-only file, FLUSHALL) is caught by the entering node's
:class:`AdmittedWatch`: see its docstring for what becomes of the tasks it queued.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from oxide_cluster.cgroups import ResourceError, Resources, parse_resources
from oxide_cluster.clock import Clock
from oxide_cluster.executor import CapacityError
from oxide_cluster.forwarding import PeerReply, PeerUnavailable
from oxide_cluster.model import RequestError, Task, TaskRequest
from oxide_cluster.placement import Candidate, rank
from oxide_cluster.redis_connection import RedisCommands
from oxide_cluster.scheduler import FairQueue

# A claimed or queued task's hash is kept a week past its last change (GET finds it).
RECORD_TTL = 8 * 24 * 3600
SCAN_LIMIT = 1000
# Queued tasks the entering node's watch asks Redis about per round (1 s), oldest checked
# first, in turns: asking about all of them each second made every node stall for
# hundreds of ms each second with tens of thousands queued (submit p99 0.8 s at 23,500).
WATCH_BATCH = 500
# Tasks looked at per dispatch round (a task whose labels no node with room has is
# skipped, not a blocker).
DISPATCH_WINDOW = 200




@attrs.frozen
class Listed:
    """A page of the queue in dispatch order, with Redis's counters."""

    queued: int                                   # every task queued (ZCARD)
    by_priority: dict[int, int]                   # the depth counters, by priority
    entries: list[tuple[int, str, dict[str, Any]]]  # (seq, id, record), dispatch order
    reads: int = 0                                # index and record reads it took


class QueueUnavailable(Exception):
    """Redis could not be reached or did not answer: nothing was decided."""


def _unavailable(failure: Failure) -> Failure:
    if failure.check(QueueUnavailable):
        return failure
    return Failure(QueueUnavailable(f"the cluster queue (Redis) is unavailable: "
                                    f"{failure.getErrorMessage() or failure.type}"))


@attrs.frozen
class Entry:
    """A task as Redis knows it: queued, started somewhere, or ended while queued."""

    state: str
    node: str | None
    reason: str | None
    finished_at: float | None
    record: dict[str, Any] | None


class QueueBackend(Protocol):
    """The queue's operations; every one is a single round trip and atomic.

    What ``ClusterDispatcher``, ``ClusterAdmission``, ``AdmittedWatch`` and ``TaskRouter``
    call, so an election backend with a durable store implements this (in its
    ``interfaces.ClusterState``). A store that cannot answer fails with
    :class:`QueueUnavailable` (a 503 ``queue_unavailable``; nothing was decided).
    Records are the task's JSON; ``seq`` grows by one per queued task, never reused.
    """

    def enqueue(self, task_id: str, record: Mapping[str, Any]) -> defer.Deferred[int]:
        """Queue the task unless its id is known; its ``seq``, or 0 when it was known."""

    def claim(self, task_id: str, node_id: str) -> defer.Deferred[str | None]:
        """Mark the task started on ``node_id``: None when this call claimed it, else why not."""

    def claim_first(self, task_id: str, node_id: str) -> defer.Deferred[str | None]:
        """Claim a new id for ``node_id`` only while no task waits in the queue: None when
        claimed, :data:`WAITING` when tasks wait (they go first), else why not."""

    def waiting(self) -> defer.Deferred[bool]:
        """Some task waits in the queue."""

    def end_queued(self, task_id: str, state: str, reason: str,
                   at: float) -> defer.Deferred[bool]:
        """End a task still queued (cancelled, rejected); False when it is not queued."""

    def scan(self, after: int, limit: int) -> defer.Deferred[list[tuple[int, str, dict[str, Any]]]]:
        """Queued tasks with ``seq`` above ``after``: (seq, id, record), by seq."""

    def where(self, task_id: str) -> defer.Deferred[Entry | None]:
        """What the store knows of the task (queued, started where, ended), or None."""

    def position(self, task_id: str) -> defer.Deferred[int | None]:
        """1-based place in admission order (priorities and groups not counted)."""

    def hold_key(self, key: str, task_id: str, ttl: float) -> defer.Deferred[str]:
        """The task id an ``Idempotency-Key`` names: ``task_id`` if this call set it."""

    def release_key(self, key: str, task_id: str) -> defer.Deferred[bool]:
        """Forget the key if it still names ``task_id`` (its submit took nothing)."""

    def retire(self, task_id: str, record: Mapping[str, Any], reason: str,
               at: float) -> defer.Deferred[str | None]:
        """End an id no node has claimed (``rejected``, with ``reason``), so none ever
        can: None when this call ended it, else its state and node (``started n2``)."""

    def states(self, task_ids: list[str]) -> defer.Deferred[list[str | None]]:
        """Each task's ``state`` in Redis, None where Redis has no record of it."""

    def listing(self, limit: int) -> defer.Deferred[Listed]:
        """The first ``limit`` queued tasks in dispatch order, reading about ``limit``
        index entries and records (never the whole queue)."""


# The listing's index (module docstring): a task's priority and group are kept in its hash
# so the scripts that end its queued state can take it out again.
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'state', 'queued', 'seq', seq, 'record', ARGV[2],
           'prio', ARGV[4], 'grp', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
local band = KEYS[2] .. ':p:' .. ARGV[4]
local members = band .. ':g:' .. ARGV[5]
redis.call('ZADD', members, seq, ARGV[1])
if redis.call('ZCARD', members) == 1 then
  redis.call('ZADD', band .. ':groups', seq, ARGV[5])
end
redis.call('HINCRBY', KEYS[2] .. ':depth', ARGV[4], 1)
return seq
"""
# Out of the listing's index (a task leaving the queue): its group's score follows its new
# oldest task; a task queued before the index existed has no ``prio`` and is skipped.
_UNINDEX = """
local function unindex(task, queue, id)
  local prio = redis.call('HGET', task, 'prio')
  if not prio then return end
  local grp = redis.call('HGET', task, 'grp')
  local band = queue .. ':p:' .. prio
  local members = band .. ':g:' .. grp
  redis.call('ZREM', members, id)
  local head = redis.call('ZRANGE', members, 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', band .. ':groups', grp)
  else
    redis.call('ZADD', band .. ':groups', head[2], grp)
  end
  if redis.call('HINCRBY', queue .. ':depth', prio, -1) <= 0 then
    redis.call('HDEL', queue .. ':depth', prio)
  end
end
"""
_CLAIM = _UNINDEX + """
local state = redis.call('HGET', KEYS[1], 'state')
if state == false or state == 'queued' then
  if state == 'queued' then unindex(KEYS[1], KEYS[2], ARGV[1]) end
  redis.call('HSET', KEYS[1], 'state', 'started', 'node', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 'ok'
end
return state .. ' ' .. (redis.call('HGET', KEYS[1], 'node') or '')
"""
# The claim of a task started where it entered, with no hop: only while nothing waits in
# the queue (queued tasks, of any priority, go first) and only for an id nobody knows.
_CLAIM_FIRST = """
if redis.call('ZCARD', KEYS[2]) > 0 then return 'waiting' end
local state = redis.call('HGET', KEYS[1], 'state')
if state == false then
  redis.call('HSET', KEYS[1], 'state', 'started', 'node', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 'ok'
end
return state .. ' ' .. (redis.call('HGET', KEYS[1], 'node') or '')
"""
WAITING = "waiting"
_END_QUEUED = _UNINDEX + """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
unindex(KEYS[1], KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'reason', ARGV[3], 'finished', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
_SCAN = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES',
                       'LIMIT', 0, ARGV[2])
local out = {}
for i = 1, #ids, 2 do
  out[#out + 1] = ids[i]
  out[#out + 1] = ids[i + 1]
  out[#out + 1] = redis.call('HGET', ARGV[3] .. ids[i], 'record') or ''
end
return out
"""
_STATES = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HGET', KEYS[i], 'state') or '' end
return out
"""
# A page in dispatch order from the index: priorities high first; within one, the groups
# by their oldest task take turns (a fresh ``FairQueue``'s order), oldest first in a group.
# One ZRANGE per task shown (plus one per group that runs out), then its record.
# Reply: total, reads, n, n priority/count pairs flat, then (id, seq, record) triples.
_LISTING = """
local queue = KEYS[1]
local need = tonumber(ARGV[1])
local depth = redis.call('HGETALL', queue .. ':depth')
local bands = {}
for i = 1, #depth, 2 do bands[#bands + 1] = {tonumber(depth[i]), depth[i]} end
table.sort(bands, function(a, b) return a[1] > b[1] end)
local reads = 1
local picked = {}
for _, prio in ipairs(bands) do
  if need <= 0 then break end
  local band = queue .. ':p:' .. prio[2]
  local alive = redis.call('ZRANGE', band .. ':groups', 0, need - 1)
  reads = reads + 1
  local turn = 0
  while #alive > 0 and need > 0 do
    local following = {}
    for _, grp in ipairs(alive) do
      if need <= 0 then break end
      local got = redis.call('ZRANGE', band .. ':g:' .. grp, turn, turn, 'WITHSCORES')
      reads = reads + 1
      if #got > 0 then
        picked[#picked + 1] = got[1]
        picked[#picked + 1] = got[2]
        need = need - 1
        following[#following + 1] = grp
      end
    end
    alive = following
    turn = turn + 1
  end
end
local out = {redis.call('ZCARD', queue), 0, #depth / 2}
for i = 1, #depth do out[#out + 1] = depth[i] end
for i = 1, #picked, 2 do
  out[#out + 1] = picked[i]
  out[#out + 1] = picked[i + 1]
  out[#out + 1] = redis.call('HGET', ARGV[2] .. picked[i], 'record') or ''
  reads = reads + 1
end
out[2] = reads
return out
"""
_HOLD_KEY = """
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"""

# The end of an id nobody claimed or queued: no claim can take it after this.
_RETIRE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state then return state .. ' ' .. (redis.call('HGET', KEYS[1], 'node') or '') end
redis.call('HSET', KEYS[1], 'state', 'rejected', 'reason', ARGV[1], 'finished', ARGV[2],
           'record', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 'ok'
"""
_RELEASE_KEY = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(flat: list[Any] | None) -> list[tuple[int, str, dict[str, Any]]]:
    """(seq, id, record) triples of a script's flat reply; entries without a record
    (ended between two commands) are left out."""
    found = []
    for index in range(0, len(flat or []), 3):
        task_id, seq, record = (_text(item) for item in (flat or [])[index:index + 3])
        if task_id and seq and record:
            found.append((int(float(seq)), task_id, json.loads(record)))
    return found


class RedisQueueBackend:
    """:class:`QueueBackend` on Lua scripts (one round trip each, atomic)."""

    def __init__(self, redis: RedisCommands, cluster: str) -> None:
        self._redis = redis
        self._prefix = f"oxide:{cluster}"
        self.queue_key = f"{self._prefix}:queue"
        self.listing_reads = 0  # index entries and records ``listing`` read, in all

    def task_key(self, task_id: str) -> str:
        return f"{self._prefix}:task:{task_id}"

    def _call(self, *command: Any) -> defer.Deferred[Any]:
        """One command; any failure (unreachable, timeout, error reply) is QueueUnavailable."""
        try:
            reply = self._redis.command(*command)
        except Exception as error:  # a backend that fails before it sends
            return defer.fail(QueueUnavailable(f"the cluster queue (Redis) is unavailable: "
                                      f"{error}"))
        return reply.addErrback(_unavailable)

    def enqueue(self, task_id: str, record: Mapping[str, Any]) -> defer.Deferred[int]:
        reply = self._call("EVAL", _ENQUEUE, 3, self.task_key(task_id), self.queue_key,
                           self.queue_key + ":seq", task_id,
                           json.dumps(record, separators=(",", ":")), RECORD_TTL,
                           int(record.get("priority") or 0),
                           str(record.get("group") or "default"))
        return reply.addCallback(lambda seq: int(seq))

    def claim(self, task_id: str, node_id: str) -> defer.Deferred[str | None]:
        reply = self._call("EVAL", _CLAIM, 2, self.task_key(task_id), self.queue_key,
                           task_id, node_id, RECORD_TTL)
        return reply.addCallback(lambda why: None if _text(why) == "ok" else _text(why))

    def claim_first(self, task_id: str, node_id: str) -> defer.Deferred[str | None]:
        reply = self._call("EVAL", _CLAIM_FIRST, 2, self.task_key(task_id), self.queue_key,
                           node_id, RECORD_TTL)
        return reply.addCallback(lambda why: None if _text(why) == "ok" else _text(why))

    def waiting(self) -> defer.Deferred[bool]:
        return self._call("ZCARD", self.queue_key).addCallback(lambda n: int(n or 0) > 0)

    def end_queued(self, task_id: str, state: str, reason: str,
                   at: float) -> defer.Deferred[bool]:
        reply = self._call("EVAL", _END_QUEUED, 2, self.task_key(task_id),
                           self.queue_key, task_id, state, reason, repr(at))
        return reply.addCallback(lambda ended: bool(int(ended)))

    def scan(self, after: int, limit: int) -> defer.Deferred[list[tuple[int, str, dict[str, Any]]]]:
        reply = self._call("EVAL", _SCAN, 1, self.queue_key, after, limit,
                           self._prefix + ":task:")
        return reply.addCallback(_entries)

    def listing(self, limit: int) -> defer.Deferred[Listed]:
        reply = self._call("EVAL", _LISTING, 1, self.queue_key, limit,
                           self._prefix + ":task:")
        return reply.addCallback(self._listed)

    def _listed(self, flat: list[Any]) -> Listed:
        reads, pairs = int(_text(flat[1]) or 0), int(_text(flat[2]) or 0)
        depth = [_text(item) or "0" for item in flat[3:3 + 2 * pairs]]
        self.listing_reads += reads
        return Listed(int(_text(flat[0]) or 0),
                      {int(depth[i]): int(depth[i + 1]) for i in range(0, len(depth), 2)
                       if int(depth[i + 1]) > 0},
                      _entries(flat[3 + 2 * pairs:]), reads)

    def where(self, task_id: str) -> defer.Deferred[Entry | None]:
        def parse(values: list[Any]) -> Entry | None:
            state, node, reason, finished, record = (_text(v) for v in values)
            if state is None:
                return None
            return Entry(state, node or None, reason,
                         float(finished) if finished else None,
                         json.loads(record) if record else None)
        reply = self._call("HMGET", self.task_key(task_id), "state", "node", "reason",
                           "finished", "record")
        return reply.addCallback(parse)

    def position(self, task_id: str) -> defer.Deferred[int | None]:
        reply = self._call("ZRANK", self.queue_key, task_id)
        return reply.addCallback(lambda rank_: None if rank_ is None else int(rank_) + 1)

    def hold_key(self, key: str, task_id: str, ttl: float) -> defer.Deferred[str]:
        reply = self._call("EVAL", _HOLD_KEY, 1, f"{self._prefix}:idem:{key}",
                           task_id, int(ttl))
        return reply.addCallback(lambda held: _text(held) or task_id)

    def retire(self, task_id: str, record: Mapping[str, Any], reason: str,
               at: float) -> defer.Deferred[str | None]:
        reply = self._call("EVAL", _RETIRE, 1, self.task_key(task_id), reason, repr(at),
                           json.dumps(record, separators=(",", ":")), RECORD_TTL)
        return reply.addCallback(lambda done: None if _text(done) == "ok" else _text(done))

    def release_key(self, key: str, task_id: str) -> defer.Deferred[bool]:
        reply = self._call("EVAL", _RELEASE_KEY, 1, f"{self._prefix}:idem:{key}", task_id)
        return reply.addCallback(lambda deleted: int(deleted) == 1)

    def states(self, task_ids: list[str]) -> defer.Deferred[list[str | None]]:
        if not task_ids:
            return defer.succeed([])
        reply = self._call("EVAL", _STATES, len(task_ids),
                           *(self.task_key(task_id) for task_id in task_ids))
        return reply.addCallback(lambda found: [_text(v) or None for v in found])


class Outcome(enum.Enum):
    """What became of one dispatch."""

    STARTED = "started"   # the node claimed and started it
    BUSY = "busy"         # the node had no room or did not answer: queue it again
    GONE = "gone"         # claimed elsewhere, cancelled or rejected: forget it
    DEPOSED = "deposed"   # the node knows a newer leader: stop dispatching


def record_labels(record: Mapping[str, Any]) -> dict[str, str]:
    labels = record.get("request", {}).get("labels") or {}
    return dict(labels) if isinstance(labels, dict) else {}


def record_resources(record: Mapping[str, Any]) -> Resources:
    """What a queued task declares (the node that runs it adds its default_resources)."""
    raw = record.get("request", {}).get("resources")
    try:
        return parse_resources(raw) if raw else Resources()
    except ResourceError:
        return Resources()


class ClusterDispatcher(service.Service):
    """The leader's loop: follow the queue in Redis, expire, dispatch where there is room.

    Every node runs it; it acts only while ``is_leader()`` holds, and forgets its view of
    the queue the moment it does not (a later term reads Redis afresh).
    """

    log = Logger()

    def __init__(self, reactor: Clock, backend: QueueBackend, *,
                 is_leader: Callable[[], bool],
                 candidates: Callable[[], list[Candidate]],
                 send: Callable[[str, dict[str, Any]], defer.Deferred[Outcome]],
                 placed: Callable[[str, Resources], None] = lambda node_id, resources: None,
                 term: Callable[[], int | None] = lambda: None,
                 default_queue_timeout: float = 3600.0, interval: float = 0.1) -> None:
        self._reactor = reactor
        self._backend = backend
        self._is_leader = is_leader
        self._candidates = candidates
        self._send = send
        self._placed = placed
        self._term = term
        self._seen_term: int | None = None
        self._default_timeout = default_queue_timeout
        self._interval = interval
        self._call: DelayedCall | None = None
        self._stepping = False
        self._reset()
        self.dispatched = 0
        self.rejected = 0

    def _reset(self) -> None:
        self._queue = FairQueue()
        self._records: dict[str, tuple[int, dict[str, Any]]] = {}
        self._in_flight: set[str] = set()
        self._deadlines: list[tuple[float, str]] = []
        self._after = -1

    def __len__(self) -> int:
        return len(self._queue)

    def ordered(self, limit: int | None = None) -> list[str]:
        """Queued ids in the leader's dispatch order (empty on a follower)."""
        return list(self._queue.ordered(limit))

    def depth_by_priority(self) -> dict[int, int]:
        """The cluster's queued tasks by priority as the leader sees them (empty on a
        follower; tasks on their way to a node are not counted)."""
        return self._queue.depth_by_priority()

    # -- lifecycle ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._schedule(0)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return defer.succeed(None)

    def wake(self) -> None:
        """Look at the queue now (a task was queued or a slot freed here)."""
        if self.running and not self._stepping:
            self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self._reactor.callLater(delay, self._tick) if self.running else None

    def _tick(self) -> None:
        self._call = None
        self._stepping = True
        step = defer.Deferred.fromCoroutine(self.step())

        def failed(failure: Failure) -> None:
            self.log.warn("cluster queue: a dispatch round failed: {error}",
                          error=failure.getErrorMessage())

        def again(_: object) -> None:
            self._stepping = False
            if self._call is None:
                self._schedule(self._interval)
        step.addErrback(failed)
        step.addBoth(again)

    # -- one round -----------------------------------------------------------------------

    async def step(self) -> None:
        """Read new queue entries, reject the expired, dispatch what fits."""
        if not self._is_leader():
            if self._records or self._after >= 0:
                self._reset()
            return
        term = self._term()
        if term != self._seen_term:
            # A new term reads the queue afresh: after Redis lost its data (a new epoch)
            # the queue's seq counter starts again below what this view followed.
            self._reset()
            self._seen_term = term
        entries = await self._backend.scan(self._after, SCAN_LIMIT)
        if not self._is_leader():
            self._reset()
            return
        for seq, task_id, record in entries:
            self._after = max(self._after, seq)
            if task_id not in self._records and task_id not in self._in_flight:
                self._push(seq, task_id, record)
        await self._expire()
        self._dispatch()

    def _push(self, seq: int, task_id: str, record: dict[str, Any]) -> None:
        self._records[task_id] = (seq, record)
        self._queue.push(task_id, int(record.get("priority") or 0),
                         str(record.get("group") or "default"), seq)
        deadline = float(record.get("created_at") or 0.0) + float(
            record.get("queue_timeout") or self._default_timeout)
        heapq.heappush(self._deadlines, (deadline, task_id))

    async def _expire(self) -> None:
        now = self._reactor.seconds()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, task_id = heapq.heappop(self._deadlines)
            found = self._records.get(task_id)
            if found is None or task_id in self._in_flight:
                continue
            self._queue.remove(task_id)
            del self._records[task_id]
            record = found[1]
            timeout = float(record.get("queue_timeout") or self._default_timeout)
            waited = now - float(record.get("created_at") or now)
            reason = (f"waited {waited:.0f}s in the queue without a free slot "
                      f"(queue_timeout {timeout:g}s)")
            if await self._backend.end_queued(task_id, "rejected", reason, now):
                self.rejected += 1

    def _dispatch(self) -> None:
        room = {c.node_id: c for c in self._candidates() if c.free_slots > 0}
        while room and self._queue:
            chosen = self._choose(room)
            if chosen is None:
                return  # no queued task fits a node with room
            task_id, best, first = chosen
            resources = record_resources(self._records[task_id][1])
            if best.free_slots <= 1:
                del room[best.node_id]
            else:
                room[best.node_id] = best.minus(resources)
            if first:
                self._queue.pop()  # the head: its group's turn is spent
            else:
                self._queue.remove(task_id)
            seq, record = self._records[task_id]
            self._in_flight.add(task_id)
            self._placed(best.node_id, resources)
            sent = self._send(best.node_id, record)
            sent.addErrback(self._send_failed, task_id)
            sent.addCallback(self._sent, task_id, seq, record)

    def _choose(self, room: Mapping[str, Candidate]) -> tuple[str, Candidate, bool] | None:
        """The first task in dispatch order that some node with room can take."""
        for index, task_id in enumerate(self._queue.ordered(DISPATCH_WINDOW)):
            record = self._records[task_id][1]
            ranked = rank(room.values(), record_labels(record), record_resources(record))
            if ranked:
                return task_id, ranked[0], index == 0
        return None

    def _send_failed(self, failure: Failure, task_id: str) -> Outcome:
        self.log.warn("dispatch of task {task_id} failed: {error}", task_id=task_id,
                      error=failure.getErrorMessage())
        return Outcome.BUSY

    def _sent(self, outcome: Outcome, task_id: str, seq: int, record: dict[str, Any]) -> None:
        self._in_flight.discard(task_id)
        if outcome is Outcome.BUSY and task_id in self._records and self._is_leader():
            self._queue.push(task_id, int(record.get("priority") or 0),
                             str(record.get("group") or "default"), seq)
            deadline = float(record.get("created_at") or 0.0) + float(
                record.get("queue_timeout") or self._default_timeout)
            heapq.heappush(self._deadlines, (deadline, task_id))
            return
        self._records.pop(task_id, None)
        if outcome is Outcome.STARTED:
            self.dispatched += 1
        elif outcome is Outcome.DEPOSED:
            self._reset()


@attrs.frozen
class QueueListing:
    """The cluster's queue as ``GET /queue`` shows it, from any node."""

    queued: int                              # every task queued in Redis
    by_priority: dict[int, int]              # from Redis's depth counters
    records: list[dict[str, Any]]            # up to the limit, in dispatch order


async def list_queue(backend: QueueBackend, limit: int) -> QueueListing:
    """Queued tasks in dispatch order (priority, group turns, FIFO), read from Redis.

    Any node can answer, not only the leader, and a page costs O(limit) index reads
    (O(log n) each), whatever the depth. The order is the one a leader reading the queue
    afresh dispatches in: within a priority the groups take turns starting from the one
    whose oldest task is oldest. A leader that has dispatched for a while is part-way
    through its turn of the groups, so the groups of one priority may be rotated against
    its next picks; priorities and the order within a group are exact."""
    page = await backend.listing(limit)
    return QueueListing(page.queued, page.by_priority,
                        [record for _, _, record in page.entries])


# -- admission on the node that runs the task ------------------------------------------------


class AlreadyAdmitted(Exception):
    """The id was claimed before (started somewhere, or ended while queued)."""

    def __init__(self, task_id: str, why: str) -> None:
        state, _, node = why.partition(" ")
        where = f" on node {node}" if node else ""
        super().__init__(f"task {task_id} was admitted before ({state}{where}); "
                         "it is never started twice")
        self.state = state
        self.node = node or None


class StaleToken(Exception):
    """A dispatch from a leader older than one this node has seen."""


class Admitter(Protocol):
    """What admission needs from the node's scheduler (``Scheduler.admit``)."""

    async def admit(self, request: TaskRequest, task_id: str,
                    claim: Callable[[Task], Awaitable[None]], *,
                    created_at: float | None = None) -> Task: ...


class PeerRequester(Protocol):
    """``forwarding.PeerClient``."""

    async def request(self, node_id: str, method: bytes, path: bytes, body: bytes | None = None,
                      headers: dict[bytes, bytes] | None = None,
                      timeout: float | None = None) -> PeerReply: ...


def dispatch_body(record: Mapping[str, Any], token: int | None) -> dict[str, Any]:
    """The JSON body of ``POST /internal/dispatch`` (version 1)."""
    return {"version": 1, "token": token, "task": dict(record)}


def parse_dispatch(body: Any) -> tuple[int | None, dict[str, Any]]:
    """(token, record) of a dispatch body; RequestError naming what is wrong."""
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    unknown = sorted(set(body) - {"version", "token", "task"})
    if unknown:
        raise RequestError(unknown[0], "unknown field")
    if body.get("version") != 1:
        raise RequestError("version", "must be 1")
    token = body.get("token")
    if token is not None and (isinstance(token, bool) or not isinstance(token, int)):
        raise RequestError("token", "must be a whole number or null")
    record = body.get("task")
    if not isinstance(record, dict) or not isinstance(record.get("id"), str) \
            or not isinstance(record.get("request"), dict):
        raise RequestError("task", "must be a task record with an id and a request")
    created = record.get("created_at")
    if created is not None and (isinstance(created, bool)
                                or not isinstance(created, int | float)):
        raise RequestError("task.created_at", "must be a number")
    return token, record


class First(enum.Enum):
    """Where a new submit goes when it cannot start where it entered."""

    QUEUE = "queue"   # tasks wait in the cluster queue: behind them
    PLACE = "place"   # nothing waits but no room here: the leader places it


class _Waiting(Exception):
    """``claim_first`` found tasks waiting in the queue."""


class ClusterAdmission:
    """Start tasks whose id another node gave, exactly once; send queued tasks to nodes."""

    log = Logger()

    def __init__(self, node_id: str, backend: QueueBackend, scheduler: Admitter, *,
                 parse: Callable[[dict[str, Any]], TaskRequest],
                 peers: PeerRequester | None,
                 token: Callable[[], int | None],
                 observe_token: Callable[[int], bool],
                 labels: Mapping[str, str] | None = None,
                 peer_timeout: float = 30.0) -> None:
        self._node_id = node_id
        self._peer_timeout = peer_timeout  # config's peer_timeout: a dispatch's answer
        self._labels = dict(labels or {})
        self._backend = backend
        self._scheduler = scheduler
        self._parse = parse
        self._peers = peers
        self._token = token
        self._observe_token = observe_token

    async def claim(self, task: Task) -> None:
        why = await self._backend.claim(task.id, self._node_id)
        if why is not None:
            raise AlreadyAdmitted(task.id, why)

    async def start(self, request: TaskRequest, task_id: str,
                    created_at: float | None = None) -> Task:
        """Claim the id, then start it here (CapacityError, AlreadyAdmitted)."""
        return await self._scheduler.admit(request, task_id, self.claim, created_at=created_at)

    async def start_first(self, request: TaskRequest, task_id: str) -> Task | First:
        """A new submit where it entered: started here at once when this node has a free
        slot and nothing waits in the cluster queue (no hop, one Redis round trip);
        :attr:`First.QUEUE` when tasks wait (it queues behind them, keeping priority and
        group order); :attr:`First.PLACE` otherwise (the leader places it)."""
        async def claim(task: Task) -> None:
            why = await self._backend.claim_first(task.id, self._node_id)
            if why == WAITING:
                raise _Waiting()
            if why is not None:
                raise AlreadyAdmitted(task.id, why)
        if not all(self._labels.get(key) == value for key, value in request.labels.items()):
            return First.PLACE
        try:
            return await self._scheduler.admit(request, task_id, claim)
        except _Waiting:
            return First.QUEUE
        except CapacityError:
            pass
        return First.QUEUE if await self._backend.waiting() else First.PLACE

    async def dispatched(self, token: int | None, record: Mapping[str, Any]) -> Task:
        """A leader's dispatch of a queued task (the body of ``/internal/dispatch``)."""
        if token is not None and not self._observe_token(token):
            raise StaleToken(f"dispatch by leader token {token}, but a newer leader is known")
        request = self._parse(dict(record["request"]))
        created = record.get("created_at")
        return await self.start(request, str(record["id"]),
                                float(created) if created is not None else None)

    def send(self, node_id: str, record: dict[str, Any]) -> defer.Deferred[Outcome]:
        """The leader's dispatch of one queued task to ``node_id`` (this node included)."""
        return defer.Deferred.fromCoroutine(self._send(node_id, record))

    async def _send(self, node_id: str, record: dict[str, Any]) -> Outcome:
        if node_id == self._node_id:
            try:
                await self.dispatched(None, record)
            except CapacityError:
                return Outcome.BUSY
            except (AlreadyAdmitted, RequestError) as error:
                self.log.info("queued task {task_id} not started: {error}",
                              task_id=record.get("id"), error=error)
                return Outcome.GONE
            return Outcome.STARTED
        if self._peers is None:
            return Outcome.BUSY
        body = json.dumps(dispatch_body(record, self._token()), separators=(",", ":"))
        try:
            reply = await self._peers.request(node_id, b"POST", b"/internal/dispatch",
                                              body.encode(),
                                              {b"Content-Type": b"application/json"},
                                              timeout=self._peer_timeout)
        except PeerUnavailable:
            return Outcome.BUSY  # a lost reply is safe: the id is claimed once at most
        if reply.status in (200, 202):
            return Outcome.STARTED
        if reply.status == 409 and b"stale_leader_token" in reply.body:
            return Outcome.DEPOSED
        if reply.status in (400, 409):
            self.log.info("queued task {task_id} refused by {node_id}: {body}",
                          task_id=record.get("id"), node_id=node_id, body=reply.body[:200])
            return Outcome.GONE
        return Outcome.BUSY


@attrs.define
class ClusterQueue:
    """The three parts the API uses: Redis operations, admission, the leader's loop."""

    backend: QueueBackend
    admission: ClusterAdmission
    dispatcher: ClusterDispatcher
    watch: AdmittedWatch
    locator: TaskLocator


# -- what the entering node keeps of the tasks it queued ---------------------------------------


class TaskLocator(Protocol):
    """Which node, if any, knows a task (``PeerClient``-backed in ``tap.py``)."""

    async def locate(self, task_id: str) -> str | None:
        """The node that has the task (this one included); None when every known node
        answered that it does not; :class:`QueueUnavailable`-free ``LookupError`` when
        some node could not be asked."""


class LostStore(Protocol):
    """Where the entering node records a task it ends ``lost`` (``Scheduler`` / store)."""

    def ended_lost(self, record: Mapping[str, Any], reason: str) -> defer.Deferred[None]: ...


LOST_REASON = ("the cluster queue (Redis) lost this task's record while it was queued (Redis "
               "restarted without its data or was flushed) and a node that may have started "
               "it could not be asked; it is not run again, to never run it twice: resubmit")


@attrs.define
class _Watched:
    record: dict[str, Any]
    withdraw: bool = False          # its submit was answered 503: never run it
    missing_since: float | None = None


class AdmittedWatch(service.Service):
    """The tasks this node queued in Redis, until Redis says they started or ended.

    Redis may lose a queued task (restart without AOF, FLUSHALL). When a watched task's
    hash is gone for ``grace`` seconds, this node asks every node it knows whether it has
    the task: the one that has it (its claim was lost with the data) gets its claim
    written back; when every node answered no, nobody started it (a claim is written
    before a start and a started task is in its node's store), so it is queued again;
    when some node cannot be asked, the task stays watched until its queue timeout and
    then ends ``lost`` here with a reason (never run twice). A submit answered 503 while
    Redis failed is *withdrawn*: ended as rejected if the queue kept it after all.
    Kept in memory: an entering node restarted while Redis loses its data loses the watch.
    """

    log = Logger()

    def __init__(self, reactor: Clock, backend: QueueBackend, locator: TaskLocator,
                 lost: LostStore, *, wake: Callable[[], None] = lambda: None,
                 default_queue_timeout: float = 3600.0, grace: float = 2.0,
                 interval: float = 1.0, batch: int = WATCH_BATCH) -> None:
        self._reactor = reactor
        self._batch = batch
        self._backend = backend
        self._locator = locator
        self._lost = lost
        self._wake = wake
        self._default_timeout = default_queue_timeout
        self._grace = grace
        self._interval = interval
        self._watched: dict[str, _Watched] = {}
        self._call: DelayedCall | None = None
        self.requeued = 0
        self.ended_lost = 0

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._watched

    def add(self, task_id: str, record: dict[str, Any]) -> None:
        self._watched[task_id] = _Watched(dict(record))

    def withdraw(self, task_id: str) -> None:
        """Its submit failed (503): end it if Redis queued it after all."""
        watched = self._watched.get(task_id)
        if watched is not None:
            watched.withdraw = True

    def record(self, task_id: str) -> dict[str, Any] | None:
        """The record of a watched task Redis does not know (now) and not withdrawn."""
        watched = self._watched.get(task_id)
        return None if watched is None or watched.withdraw else watched.record

    def startService(self) -> None:
        super().startService()
        self._call = self._reactor.callLater(self._interval, self._tick)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return defer.succeed(None)

    def _tick(self) -> None:
        self._call = None
        check = defer.Deferred.fromCoroutine(self.check())

        def failed(failure: Failure) -> None:
            self.log.warn("cluster queue: checking queued tasks failed: {error}",
                          error=failure.getErrorMessage())

        def again(_: object) -> None:
            if self.running:
                self._call = self._reactor.callLater(self._interval, self._tick)
        check.addErrback(failed)
        check.addBoth(again)

    async def check(self) -> None:
        """One round over the ``batch`` tasks checked longest ago: forget started/ended
        tasks, settle the ones Redis lost; the ones still queued go to the back."""
        ids = list(itertools.islice(self._watched, self._batch))
        if not ids:
            return
        try:
            states = await self._backend.states(ids)
        except QueueUnavailable:
            return  # nothing is decided while Redis is away
        now = self._reactor.seconds()
        for task_id, state in zip(ids, states, strict=True):
            watched = self._watched.get(task_id)
            if watched is None:
                continue
            self._watched[task_id] = self._watched.pop(task_id)  # its turn is spent
            if state is not None:
                watched.missing_since = None
                if state != "queued":
                    del self._watched[task_id]
                elif watched.withdraw:
                    await self._settle_withdrawn(task_id, now)
                continue
            if watched.withdraw:
                del self._watched[task_id]  # never queued, or lost: the client was told 503
                continue
            if watched.missing_since is None:
                watched.missing_since = now
            elif now - watched.missing_since >= self._grace:
                await self._recover(task_id, watched, now)

    async def _settle_withdrawn(self, task_id: str, now: float) -> None:
        try:
            await self._backend.end_queued(task_id, "rejected", "the cluster queue was "
                                           "unavailable when it was submitted (answered 503)",
                                           now)
        except QueueUnavailable:
            return
        self._watched.pop(task_id, None)

    async def _recover(self, task_id: str, watched: _Watched, now: float) -> None:
        try:
            holder = await self._locator.locate(task_id)
        except LookupError as error:
            record = watched.record
            created = record.get("created_at")
            deadline = float(now if created is None else created) + float(
                record.get("queue_timeout") or self._default_timeout)
            if now >= deadline:
                del self._watched[task_id]
                self.log.warn("task {task_id}: {reason} ({error})", task_id=task_id,
                              reason=LOST_REASON, error=error)
                await self._lost.ended_lost(record, LOST_REASON)
                self.ended_lost += 1
            return
        try:
            if holder is not None:
                # Its claim went with Redis's data: write it back, GET finds it again.
                await self._backend.claim(task_id, holder)
                self._watched.pop(task_id, None)
                return
            seq = await self._backend.enqueue(task_id, watched.record)
        except QueueUnavailable:
            return
        watched.missing_since = None
        if seq:
            self.requeued += 1
            self.log.warn("task {task_id} was lost from the cluster queue (Redis lost its "
                          "data) and no node has it: queued again", task_id=task_id)
            self._wake()


class PeerLocator:
    """:class:`TaskLocator` asking this node's store and every node it has heard of."""

    def __init__(self, node_id: str, local: Callable[[str], Awaitable[Task | None]],
                 peers: PeerRequester | None, known: Callable[[], list[str]]) -> None:
        self._node_id = node_id
        self._local = local
        self._peers = peers
        self._known = known

    async def locate(self, task_id: str) -> str | None:
        if await self._local(task_id) is not None:
            return self._node_id
        nodes = [node_id for node_id in self._known() if node_id != self._node_id]
        if nodes and self._peers is None:
            raise LookupError("no peer client to ask " + ", ".join(nodes))
        path = f"/task/{task_id}".encode()
        silent = []
        for node_id in nodes:
            assert self._peers is not None
            try:
                reply = await self._peers.request(node_id, b"GET", path, timeout=5)
            except PeerUnavailable:
                silent.append(node_id)
                continue
            if reply.status == 200:
                return node_id
            if reply.status != 404:
                silent.append(node_id)
        if silent:
            raise LookupError("could not ask " + ", ".join(silent))
        return None

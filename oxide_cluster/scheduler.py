"""The node's scheduler: admission, a durable fair queue, and dispatch onto the executor.

A task that cannot start now waits in the queue instead of being refused (``queue: false``
keeps the old 429). Dispatch order: higher ``priority`` first; within one priority the
groups take turns (deficit round robin where every start costs its group one turn), so a
group of 200 tasks and a group of 1 interleave; first in, first out within a group.
Queued tasks are records in the node's store (state ``queued``), so they survive an
agent restart. A cluster with Redis queues in Redis instead (``cluster_queue.py``), sharing
the :class:`FairQueue` order; there this service only starts tasks (``admit``).
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import attrs
from sortedcontainers import SortedList
from twisted.application import service
from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from oxide_cluster.capacity import Allocatable, Capacity, describe, misfit
from oxide_cluster.cgroups import Resources
from oxide_cluster.clock import Clock
from oxide_cluster.drain import RETRY_AFTER as DRAIN_RETRY_AFTER
from oxide_cluster.drain import Drain
from oxide_cluster.executor import CapacityError
from oxide_cluster.model import Task, TaskRequest, TaskState
from oxide_cluster.waiters import Waiters

IDEMPOTENCY_TTL = 24 * 3600.0
# Refusals that end when time passes or a slot frees: the task waits for them.
_WAITABLE = frozenset({"no_free_slots", "no_free_resources", "cpu_busy", "memory_busy"})
# How far down the dispatch order the queue looks for a task that fits the free resources.
DISPATCH_WINDOW = 200


class Unschedulable(Exception):
    """No known node has ever advertised the labels a task asks for, or allocatable room
    for what it declares (``resource``: ``cpus`` or ``memory``)."""

    def __init__(self, labels: Mapping[str, str], resource: str | None = None,
                 resources: Resources | None = None, largest: str = "") -> None:
        names = ", ".join(f"{key}={value}" for key, value in sorted(labels.items()))
        if resource is None:
            message = f"no known node has the labels {names}: the task could never start"
        else:
            where = f" with the labels {names}" if names else ""
            message = (f"resources.{resource}: the task declares "
                       f"{describe(resource, resources)} and no known node{where} has that "
                       f"much allocatable ({largest}): the task could never start")
        super().__init__(message)
        self.labels = dict(labels)
        self.resource = resource


class SeenTask(Exception):
    """A task id this node already has: a repeated delivery is never a second run."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} was already admitted here; it is never started "
                         "twice")
        self.task_id = task_id


class QueueStore(Protocol):
    """What the scheduler needs from the store (``oxide_cluster.store.Store``)."""

    def put_task(self, task: Task) -> defer.Deferred[None]: ...

    def get_task(self, task_id: str) -> defer.Deferred[Task | None]: ...

    def queued_tasks(self, node_id: str) -> defer.Deferred[list[Task]]: ...

    def find_idempotent(self, key: str, since: float) -> defer.Deferred[Task | None]: ...


class LocalExecutor(Protocol):
    """What the scheduler needs from the executor (``oxide_cluster.executor.Executor``)."""

    node_id: str
    state_listeners: list[Callable[[Task], None]]

    def check_capacity(self, resources: Resources | None = None) -> None: ...

    @property
    def free_slots(self) -> int: ...

    def new_task(self, request: TaskRequest, *, task_id: str | None = None,
                 attempt: int = 1, retry_of: str | None = None) -> Task: ...

    def start(self, task: Task, secret_env: Mapping[str, str]) -> defer.Deferred[Task]: ...

    def live_task(self, task_id: str) -> Task | None: ...

    def when_finished(self, task_id: str) -> defer.Deferred[Task] | None: ...

    def cancel(self, task_id: str, reason: str = ...) -> bool: ...

    def cancel_all(self, reason: str) -> int: ...

    def publish_state(self, task: Task) -> None: ...


class QueuePins(Protocol):
    """Keeps what a queued task needs from being dropped while it waits (its workspace
    blobs: ``oxide_cluster.workspace.Workspaces``); the executor takes over at start."""

    def hold(self, task: Task) -> None: ...

    def release(self, task_id: str) -> None: ...



# -- the ordering structure ---------------------------------------------------------------


class _Group:
    """One group's queued tasks in one priority band, as (sequence, task id), FIFO."""

    __slots__ = ("in_ring", "items", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: SortedList = SortedList()
        self.in_ring = False


class _Band:
    """One priority: its groups and the ring of turns between them."""

    __slots__ = ("count", "groups", "ring")

    def __init__(self) -> None:
        self.groups: dict[str, _Group] = {}
        # Groups in turn order; an emptied group may linger here until its turn comes.
        self.ring: collections.deque[_Group] = collections.deque()
        self.count = 0

    def live_ring(self) -> list[_Group]:
        return [group for group in self.ring if group.items]


class FairQueue:
    """Dispatch order of queued task ids: priority, then group turns, then FIFO.

    ``push``, ``pop`` and ``remove`` cost O(log n) (amortised: emptied groups and bands
    are dropped lazily, when their turn comes); ``position`` costs O(log n) plus the
    number of groups and priorities.
    """

    def __init__(self) -> None:
        self._bands: dict[int, _Band] = {}
        self._heap: list[int] = []  # negated priorities with a band (may hold stale ones)
        self._index: dict[str, tuple[int, str, int]] = {}

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._index

    def push(self, task_id: str, priority: int, group: str, seq: int) -> None:
        if task_id in self._index:
            raise ValueError(f"task {task_id} is queued already")
        band = self._bands.get(priority)
        if band is None:
            band = self._bands[priority] = _Band()
            heapq.heappush(self._heap, -priority)
        members = band.groups.get(group)
        if members is None:
            members = band.groups[group] = _Group(group)
        members.items.add((seq, task_id))
        if not members.in_ring:
            members.in_ring = True
            band.ring.append(members)
        band.count += 1
        self._index[task_id] = (priority, group, seq)

    def pop(self) -> str | None:
        """The next task id to start, removed from the queue; None when empty."""
        while self._heap:
            priority = -self._heap[0]
            band = self._bands.get(priority)
            if band is None or band.count == 0:
                heapq.heappop(self._heap)
                if band is not None and self._bands.get(priority) is band:
                    del self._bands[priority]
                continue
            while band.ring:
                members = band.ring.popleft()
                if not members.items:
                    members.in_ring = False  # emptied by ``remove``: drop it now
                    continue
                _, task_id = members.items.pop(0)
                band.count -= 1
                if members.items:
                    band.ring.append(members)  # its turn is spent: to the back
                else:
                    members.in_ring = False
                    del band.groups[members.name]
                del self._index[task_id]
                return task_id
            band.count = 0  # unreachable unless counts drifted; drop the band
        return None

    def remove(self, task_id: str) -> bool:
        found = self._index.pop(task_id, None)
        if found is None:
            return False
        priority, group, seq = found
        band = self._bands[priority]
        members = band.groups[group]
        members.items.remove((seq, task_id))
        band.count -= 1
        if not members.items:
            del band.groups[group]  # the ring drops it at its turn
        return True

    def position(self, task_id: str) -> int | None:
        """1-based place in dispatch order, or None when not queued."""
        found = self._index.get(task_id)
        if found is None:
            return None
        priority, group, seq = found
        ahead = sum(band.count for other, band in self._bands.items() if other > priority)
        band = self._bands[priority]
        members = band.groups[group]
        turn = members.items.index((seq, task_id))  # served in round ``turn`` of the ring
        passed_own = False
        for other in band.live_ring():
            size = len(other.items)
            ahead += min(size, turn)
            if other is members:
                passed_own = True
            elif not passed_own and size > turn:
                ahead += 1
        return ahead + 1

    def ordered(self, limit: int | None = None) -> Iterator[str]:
        """Task ids in dispatch order (the order ``pop`` would return them now)."""
        emitted = 0
        for priority in sorted(self._bands, reverse=True):
            alive = self._bands[priority].live_ring()
            turn = 0
            while alive:
                following = []
                for members in alive:
                    if limit is not None and emitted >= limit:
                        return
                    yield members.items[turn][1]
                    emitted += 1
                    if len(members.items) > turn + 1:
                        following.append(members)
                alive = following
                turn += 1

    def depth_by_priority(self) -> dict[int, int]:
        return {priority: band.count for priority, band in self._bands.items() if band.count}


# -- the service ----------------------------------------------------------------------------


@attrs.define(eq=False)
class _Queued:
    task: Task
    secret_env: dict[str, str]
    timer: DelayedCall | None = None


Room = tuple[Mapping[str, str], Allocatable | None]


def _no_rooms() -> Iterable[Room]:
    return ()


class LabelBook:
    """Every label set a node has advertised (this one, and peers alive or not), with the
    allocatable resources it announced (None: it announced none, so it may fit anything)."""

    def __init__(self, local: Mapping[str, str],
                 current: Callable[[], Iterable[Mapping[str, str]]] = lambda: (), *,
                 local_allocatable: Allocatable | None = None,
                 rooms: Callable[[], Iterable[Room]] = _no_rooms) -> None:
        self._local = dict(local)
        self._current = current
        self._local_allocatable = local_allocatable
        self._rooms = rooms
        self._seen: dict[str, dict[str, str]] = {}
        self._seen_allocatable: dict[str, Allocatable | None] = {}

    def membership_event(self, event: dict[str, Any]) -> None:
        """A membership listener: remember each peer's labels, even after it is pruned."""
        node = event.get("node")
        if isinstance(node, dict) and isinstance(node.get("labels"), dict):
            node_id = str(node.get("node_id"))
            self._seen[node_id] = dict(node["labels"])
            stats = node.get("stats")
            capacity = Capacity.from_stats(stats) if isinstance(stats, dict) else None
            if capacity is not None or node_id not in self._seen_allocatable:
                self._seen_allocatable[node_id] = \
                    capacity.allocatable if capacity is not None else None

    def unfit(self, labels: Mapping[str, str], resources: Resources) -> Unschedulable | None:
        """Why no node with ``labels`` could ever fit ``resources`` (None: one could)."""
        if resources.cpus is None and resources.memory is None:
            return None
        rooms: list[Room] = [(self._local, self._local_allocatable),
                             *((self._seen[node_id], allocatable) for node_id, allocatable
                               in self._seen_allocatable.items()),
                             *self._rooms()]
        matching = [allocatable for known, allocatable in rooms
                    if all(known.get(key) == value for key, value in labels.items())]
        if not matching or any(allocatable is None for allocatable in matching):
            return None
        known = [a for a in matching if a is not None]
        reasons = [misfit(resources, a.cpus, a.memory) for a in known]
        if any(reason is None for reason in reasons):
            return None
        resource = "cpus" if "cpus" in reasons else "memory"
        if resource == "cpus":
            largest = f"the most is {max(a.cpus for a in known):g} CPUs"
        else:
            largest = f"the most is {max(a.memory for a in known) // 2**20} MiB"
        return Unschedulable(labels, resource, resources, largest)

    def schedulable(self, labels: Mapping[str, str]) -> bool:
        if not labels:
            return True
        for known in (self._local, *self._seen.values(), *self._current()):
            if all(known.get(key) == value for key, value in labels.items()):
                return True
        return False


class Scheduler(service.Service):
    """Owns the life of a local task before it runs: admit, queue, dispatch, expire."""

    log = Logger()

    def __init__(self, reactor: Clock, store: QueueStore, executor: LocalExecutor, *,
                 default_queue_timeout: float, labels: LabelBook | None = None,
                 idempotency_ttl: float = IDEMPOTENCY_TTL,
                 pins: QueuePins | None = None, drain: Drain | None = None,
                 default_resources: Resources = Resources()) -> None:
        self._reactor = reactor
        self._default_resources = default_resources
        self.drain_state = drain if drain is not None else Drain()
        self._pins = pins
        self._store = store
        self._executor = executor
        self._default_queue_timeout = default_queue_timeout
        self._labels = labels if labels is not None else LabelBook({})
        self._ttl = idempotency_ttl
        self._queue = FairQueue()
        self._entries: dict[str, _Queued] = {}
        self._seq = 0
        self._keys: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self._retry: DelayedCall | None = None
        self._claiming = 0  # slots held by ``admit`` while its claim is on its way
        # Tasks ``admit`` is claiming: Redis may already name this node as the one
        # that runs them, so a GET forwarded here must find them (not 404).
        self._admitting: dict[str, Task] = {}
        self._submitting: set[str] = set()  # ids between ``submit`` and started/queued
        self._deadline_call: DelayedCall | None = None
        self._waiters: Waiters[str, Task] = Waiters()  # for queued tasks' ends
        self.recovered = False
        self.started_total = 0
        self.rejected_total = 0

    # -- lifecycle ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._executor.state_listeners.append(self._task_changed)
        self._dispatch()

    def stopService(self) -> defer.Deferred[None]:
        """Queued tasks stay queued in the store: the next start dispatches them."""
        super().stopService()
        if self._task_changed in self._executor.state_listeners:
            self._executor.state_listeners.remove(self._task_changed)
        for entry in self._entries.values():
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        return defer.succeed(None)

    async def recover(self) -> list[Task]:
        """Queue again what the store holds as queued; call once the executor is ready."""
        tasks: list[Task] = await self._store.queued_tasks(self._executor.node_id)
        now = self._reactor.seconds()
        requeued = []
        for task in tasks:
            self._seq = max(self._seq, (task.queue_seq or 0) + 1)
            if task.secret_env_keys:
                self._end(task, TaskState.REJECTED,
                          "its secret_env values are kept in memory only and were lost "
                          "when the agent restarted; submit it again")
                continue
            remaining = (task.created_at + self._timeout_of(task)) - now
            if remaining <= 0:
                self.rejected_total += 1
                self._end(task, TaskState.REJECTED, self._waited(task, now))
                continue
            entry = _Queued(task, {})
            self._enqueue(entry, remaining)
            requeued.append(task)
        if requeued:
            self.log.info("{count} queued tasks restored from the store", count=len(requeued))
        self.recovered = True
        self._dispatch()
        return requeued

    # -- admission ------------------------------------------------------------------

    def check_schedulable(self, labels: Mapping[str, str],
                          resources: Resources | None = None) -> None:
        """Raise Unschedulable for labels no known node has ever advertised, or declared
        ``resources`` (this node's ``default_resources`` filling the gaps) that no known
        node with those labels has allocatable."""
        if not self._labels.schedulable(labels):
            raise Unschedulable(labels)
        declared = (resources or Resources()).over(self._default_resources)
        unfit = self._labels.unfit(labels, declared)
        if unfit is not None:
            raise unfit

    async def submit(self, request: TaskRequest, *, idempotency_key: str | None = None,
                     queueable: bool = True, attempt: int = 1,
                     retry_of: str | None = None, task_id: str | None = None) -> Task:
        """Start the task now, or queue it (``queueable`` and ``request.queue``), or raise
        CapacityError; a known ``idempotency_key`` returns the task it first made.

        ``task_id``, given where the task entered the cluster, is refused (SeenTask) when
        this node already has it: a delivery repeated after a lost reply runs nothing."""
        if idempotency_key is not None:
            earlier = await self._idempotent(idempotency_key)
            if earlier is not None:
                return earlier
        if task_id is not None and (task_id in self._submitting or task_id in self._admitting
                                    or await self.find(task_id) is not None):
            raise SeenTask(task_id)
        if not self.recovered:
            raise CapacityError(503, "starting", "the node is still starting", 1)
        self._refuse_if_draining()
        queueable = queueable and request.queue
        task = self._executor.new_task(request, task_id=task_id, attempt=attempt,
                                       retry_of=retry_of)
        task.idempotency_key = idempotency_key
        self._submitting.add(task.id)
        try:
            return await self._admit(task, request, queueable)
        finally:
            self._submitting.discard(task.id)

    async def _admit(self, task: Task, request: TaskRequest, queueable: bool) -> Task:
        resources = Resources.from_json(task.resources)
        if not self._queue:
            try:
                self._executor.check_capacity(resources)
            except CapacityError as error:
                if not queueable or error.code not in _WAITABLE:
                    raise
            else:
                return await self._start(task, request.secret_env)
        elif not queueable:
            self._executor.check_capacity(resources)  # refuse as before if it is full
            return await self._start(task, request.secret_env)
        return await self._queue_task(task, dict(request.secret_env))

    async def admit(self, request: TaskRequest, task_id: str,
                    claim: Callable[[Task], Awaitable[None]], *,
                    created_at: float | None = None) -> Task:
        """Start now a task whose id was given where it entered the cluster, once ``claim``
        (exactly-once, in Redis) succeeds; CapacityError when there is no room.

        A slot is held while the claim is on its way, so two claims never share one."""
        if not self.recovered:
            raise CapacityError(503, "starting", "the node is still starting", 1)
        self._refuse_if_draining()
        task = self._executor.new_task(request, task_id=task_id)
        self._executor.check_capacity(Resources.from_json(task.resources))
        if self._claiming >= self._executor.free_slots or self._queue:
            raise CapacityError(429, "no_free_slots", "every task slot is taken or promised",
                                1)
        if created_at is not None:
            task.created_at = created_at
        self._claiming += 1
        self._admitting[task.id] = task
        try:
            await claim(task)
        except BaseException:
            del self._admitting[task.id]
            raise
        finally:
            self._claiming -= 1
        try:
            return await self._start(task, request.secret_env)
        finally:
            self._admitting.pop(task.id, None)

    # -- drain ----------------------------------------------------------------------

    def drain(self, deadline: float | None = None) -> None:
        """Take no new tasks and start none from the queue; running ones finish, or are
        cancelled ``deadline`` seconds from now (a later drain may set a new deadline)."""
        if not self.drain_state.draining:
            self.drain_state.draining = True
            self.drain_state.since = self._reactor.seconds()
            self.log.info("draining: no new tasks; {queued} queued stay queued",
                          queued=len(self._queue))
        if deadline is not None:
            self._cancel_deadline()
            self.drain_state.deadline = self._reactor.seconds() + deadline
            self._deadline_call = self._reactor.callLater(deadline, self._deadline_passed)

    def resume(self) -> None:
        """Undo ``drain``: admit again and start what waited in the queue."""
        self._cancel_deadline()
        if self.drain_state.draining:
            self.drain_state.draining = False
            self.drain_state.since = None
            self.log.info("drain ended: taking tasks again")
            self._dispatch()

    def _cancel_deadline(self) -> None:
        self.drain_state.deadline = None
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        self._deadline_call = None

    def _deadline_passed(self) -> None:
        self._deadline_call = None
        cancelled = self._executor.cancel_all("cancelled: the node's drain deadline passed")
        self.log.info("drain deadline: {count} running tasks cancelled", count=cancelled)

    def _refuse_if_draining(self) -> None:
        if self.drain_state.draining:
            raise CapacityError(503, "draining",
                                "this node is draining: it takes no new tasks",
                                DRAIN_RETRY_AFTER)

    async def idempotent(self, key: str) -> Task | None:
        """The task an earlier submit with ``key`` made here within the last 24 h."""
        return await self._idempotent(key)

    async def _idempotent(self, key: str) -> Task | None:
        now = self._reactor.seconds()
        self._forget_keys(now)
        known = self._keys.get(key)
        if known is not None and known[1] <= now:  # remembered out of order, expired
            del self._keys[key]
            known = None
        if known is None:
            found = await self._store.find_idempotent(key, now - self._ttl)
            known = self._keys.get(key)  # admitted while the store was asked?
            if known is None:
                if found is not None:
                    self._remember(key, found.id, found.created_at)
                return found
        return await self.find(known[0])

    def _remember(self, key: str, task_id: str, created_at: float) -> None:
        self._keys[key] = (task_id, created_at + self._ttl)
        self._keys.move_to_end(key)

    def _forget_keys(self, now: float) -> None:
        while self._keys:
            key, (_, expires) = next(iter(self._keys.items()))
            if expires > now:
                break
            del self._keys[key]

    async def _start(self, task: Task, secret_env: Mapping[str, str]) -> Task:
        if task.idempotency_key is not None:
            self._remember(task.idempotency_key, task.id, task.created_at)
        self.started_total += 1
        started: Task = await self._executor.start(task, secret_env)
        return started

    async def _queue_task(self, task: Task, secret_env: dict[str, str]) -> Task:
        task.group = task.group or "default"
        task.queue_seq = self._seq
        self._seq += 1
        entry = _Queued(task, secret_env)
        self._enqueue(entry, self._timeout_of(task))
        if task.idempotency_key is not None:
            self._remember(task.idempotency_key, task.id, task.created_at)
        try:
            await self._store.put_task(task)
        except Exception:
            self._drop(task.id)
            if task.idempotency_key is not None:
                self._keys.pop(task.idempotency_key, None)
            raise
        # A slot may have freed while the record was written.
        self._dispatch()
        return task

    def _timeout_of(self, task: Task) -> float:
        return task.queue_timeout or self._default_queue_timeout

    def _enqueue(self, entry: _Queued, remaining: float) -> None:
        task = entry.task
        self._entries[task.id] = entry
        self._queue.push(task.id, task.priority, task.group or "default", task.queue_seq or 0)
        entry.timer = self._reactor.callLater(max(0.0, remaining), self._expired, task.id)
        if self._pins is not None:
            self._pins.hold(task)

    def _drop(self, task_id: str) -> _Queued | None:
        entry = self._entries.pop(task_id, None)
        self._queue.remove(task_id)
        if entry is not None and entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        if entry is not None and self._pins is not None:
            self._pins.release(task_id)
        return entry

    # -- dispatch -------------------------------------------------------------------

    def _task_changed(self, task: Task) -> None:
        if task.state.terminal:
            self._dispatch()

    def _dispatch(self) -> None:
        """Start queued tasks while the executor has room, in dispatch order."""
        if not self.running or not self.recovered or self.drain_state.draining:
            return
        while self._queue:
            try:
                self._executor.check_capacity()
            except CapacityError as error:
                if error.code in ("cpu_busy", "memory_busy") and \
                        (self._retry is None or not self._retry.active()):
                    # No task end will wake us for a load that falls: look again later.
                    self._retry = self._reactor.callLater(error.retry_after, self._dispatch)
                return
            task_id = self._first_that_fits()
            if task_id is None:
                return  # none fits the free resources: a task's end dispatches again
            entry = self._entries.pop(task_id)
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            self.started_total += 1
            started = self._executor.start(entry.task, entry.secret_env)
            if self._pins is not None:  # a no-op once the executor took the pins over
                self._pins.release(task_id)
            started.addErrback(self._start_failed, task_id)
            if self._waiters.count(task_id):
                self._follow(entry.task, started)

    def _first_that_fits(self) -> str | None:
        """Take the first queued task, in dispatch order, that fits the free declared
        resources (the head's turn is spent only when the head goes)."""
        for index, task_id in enumerate(self._queue.ordered(DISPATCH_WINDOW)):
            resources = Resources.from_json(self._entries[task_id].task.resources)
            try:
                self._executor.check_capacity(resources)
            except CapacityError:
                continue
            if index == 0:
                self._queue.pop()
            else:
                self._queue.remove(task_id)
            return task_id
        return None

    def _follow(self, task: Task, started: defer.Deferred[Task]) -> None:
        """Wake the waiters of a task that left the queue when the executor ends it (one
        executor waiter per task; later callers ask the executor themselves)."""
        def wake(result: object) -> None:
            self._waiters.fire(task.id, result if isinstance(result, Task) else task)

        finished = self._executor.when_finished(task.id)
        if finished is None:  # ended at once (command not found, ...)
            started.addBoth(wake)
        else:
            finished.addCallback(wake)

    def _start_failed(self, failure: Failure, task_id: str) -> None:
        self.log.error("queued task {task_id} could not be recorded as started: {error}",
                       task_id=task_id, error=failure.getErrorMessage())

    def _expired(self, task_id: str) -> None:
        entry = self._entries.get(task_id)
        if entry is None:
            return
        entry.timer = None
        self.rejected_total += 1
        self._finish_queued(task_id, TaskState.REJECTED,
                            self._waited(entry.task, self._reactor.seconds()))

    def _waited(self, task: Task, now: float) -> str:
        return (f"waited {now - task.created_at:.0f}s in the queue without a free slot "
                f"(queue_timeout {self._timeout_of(task):g}s)")

    def _finish_queued(self, task_id: str, state: TaskState, reason: str) -> Task | None:
        entry = self._drop(task_id)
        if entry is None:
            return None
        self._end(entry.task, state, reason)
        return entry.task

    def _end(self, task: Task, state: TaskState, reason: str) -> defer.Deferred[None]:
        task.state = state
        task.reason = reason
        task.finished_at = self._reactor.seconds()
        stored = self._store.put_task(task)
        stored.addErrback(lambda failure: self.log.error(
            "could not record the end of queued task {task_id}: {error}", task_id=task.id,
            error=failure.getErrorMessage()))
        stored.addCallback(lambda _: self._waiters.fire(task.id, task))
        self._executor.publish_state(task)
        return stored

    # -- queries and cancel --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._queue)

    def queued_task(self, task_id: str) -> Task | None:
        entry = self._entries.get(task_id)
        return entry.task if entry is not None else None

    def live_task(self, task_id: str) -> Task | None:
        """The in-memory record of a queued or running task."""
        return (self.queued_task(task_id) or self._executor.live_task(task_id)
                or self._admitting.get(task_id))

    async def find(self, task_id: str) -> Task | None:
        live = self.live_task(task_id)
        if live is not None:
            return live
        found: Task | None = await self._store.get_task(task_id)
        return found

    def position(self, task_id: str) -> int | None:
        return self._queue.position(task_id)

    def queued(self, limit: int | None = None) -> list[Task]:
        """Queued tasks in dispatch order."""
        return [self._entries[task_id].task for task_id in self._queue.ordered(limit)]

    def depth_by_priority(self) -> dict[int, int]:
        return self._queue.depth_by_priority()

    def when_finished(self, task_id: str) -> defer.Deferred[Task] | None:
        """Fires with the task once it ends, queued or running; None if neither here.

        A waiter cancelled (a long-poll's timeout) is forgotten at once.
        """
        if task_id not in self._entries:
            return self._executor.when_finished(task_id)
        return self._waiters.wait(task_id)

    def cancel(self, task_id: str, reason: str = "cancelled by request") -> bool:
        """Cancel a queued task (it never starts) or begin stopping a running one."""
        if self._finish_queued(task_id, TaskState.CANCELLED, reason) is not None:
            return True
        return self._executor.cancel(task_id, reason)

"""Who leads the cluster: standalone (no Redis, this node leads itself) or a Redis lease.

The Redis elector follows docs/architecture.rst, "Leader election": the key
``oxide:{cluster}:leader`` holds ``node_id:token`` and is set with ``SET NX PX ttl``; the
fencing token comes from ``INCR oxide:{cluster}:epoch`` on every acquisition. The leader
renews every ttl/3 with a compare-and-pexpire script and releases with compare-and-delete.

Safety rests on the local clock, never on Redis telling us we lost: the lease is counted
from the moment the SET/renew was *sent* (Redis can only start its expiry later than that)
and this node stops leading ``margin`` (ttl/4) before it would expire, so two nodes never
both believe they lead. ``is_leader`` re-checks that deadline on every read, so no code path
(an HTTP request served right after a SIGCONT, before the overdue timers ran) sees a stale
True; a renew reply that arrives after the deadline never restores leadership.

Redis losing its data (restart without persistence) removes a live lease, so another node
could SET NX while the old leader still leads by its local deadline. The epoch script tells
the acquirer when the counter was new or had fallen below ``floor`` (the highest token this
node has seen: its own and every leader it learned by GET); the acquirer then holds the key
for one ttl before it leads, by which time every earlier leader's deadline has passed (their
last successful renew reached Redis before the data was lost). The same script lifts the
counter above ``floor``, so as long as one node that saw the old leader survives, tokens keep
increasing. A brand-new Redis also costs one ttl before the first leader (harmless). A node
that never saw the old leader can win with a small token if it is the first to ask; keep the
epoch persistent (``appendonly yes``) where tokens must increase across whole-cluster
restarts, and treat the local guard as the fallback.

txredisapi stays behind :class:`LockBackend` so the logic is tested with a fake and a
``task.Clock``; the Redis backend's connection (``redis_connection.py``, a service with
reconnect backoff) times every command with the injected reactor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from oxide_cluster.interfaces import IElectionBackend
from oxide_cluster.redis_connection import RedisAddress, RedisCommands, RedisConnection

log = Logger()


class StandaloneElector(service.Service):
    """The elector of a node without Redis: always the leader, with a fixed token 1."""

    is_leader = True
    token = 1

    def __init__(self, reactor: Any, node_id: str) -> None:
        self._reactor = reactor
        self.node_id = node_id
        self.since: float | None = None
        self.highest_token = 1

    def startService(self) -> None:
        super().startService()
        self.since = self._reactor.seconds()

    def leader(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "token": self.token, "since": self.since}

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Leadership never changes without Redis; kept for the same surface."""

    def observe_token(self, token: int) -> bool:
        return token >= self.token

    def current_token_valid(self, token: int) -> bool:
        return token >= self.token


class LockBackend(Protocol):
    """The five lock operations the elector needs; every call returns a Deferred."""

    def acquire(self, key: str, value: str, ttl_ms: int) -> defer.Deferred[bool]:
        """``SET key value NX PX ttl_ms``: True when this call created the key."""

    def renew(self, key: str, value: str, ttl_ms: int) -> defer.Deferred[bool]:
        """Reset the expiry only while ``key`` still holds ``value``."""

    def release(self, key: str, value: str) -> defer.Deferred[bool]:
        """Delete ``key`` only while it still holds ``value``."""

    def get(self, key: str) -> defer.Deferred[str | None]:
        """The value of ``key`` or None."""

    def next_token(self, key: str, floor: int,
                   quiet_ms: int) -> defer.Deferred[tuple[int, bool]]:
        """INCR ``key`` lifted above ``floor`` (atomic). True while the epoch is new: for
        ``quiet_ms`` after it was found missing or lower, every acquirer (not only the first)
        must wait out a lease that Redis may have lost."""

    def close(self) -> defer.Deferred[None]:
        """Drop the connection; later calls may reconnect."""


def parse_value(value: str) -> tuple[str, int] | None:
    """``node_id:token`` → (node_id, token); None for anything else."""
    node_id, sep, token = value.rpartition(":")
    if not sep or not node_id or not token.isdigit():
        return None
    return node_id, int(token)


@attrs.frozen
class ElectionTiming:
    """Lease timing derived from the ttl (seconds); see docs/architecture.rst and the README."""

    ttl: float = 2.0

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.ttl * 1000))

    @property
    def margin(self) -> float:
        """Step down this long before Redis would expire the key (drift, scheduling)."""
        return self.ttl / 4

    @property
    def renew_interval(self) -> float:
        return self.ttl / 3

    @property
    def poll_interval(self) -> float:
        """Followers look for a free key this often: bounds failover after a release."""
        return min(0.2, self.ttl / 5)

    @property
    def max_backoff(self) -> float:
        return max(2.0, self.poll_interval)


class RedisElector(service.MultiService):
    """Leader election with a Redis lease and fencing tokens (module docstring: why safe).

    Its children (the Redis connection of ``redis_elector``) start before the first step
    and stop only after the lease is released.
    """

    def __init__(self, reactor: Any, node_id: str, backend: LockBackend,
                 cluster: str = "oxide", ttl: float = 2.0,
                 monotonic: Callable[[], float] | None = None) -> None:
        super().__init__()
        self._reactor = reactor
        self.node_id = node_id
        self.backend = backend
        self.key = f"oxide:{cluster}:leader"
        self.epoch_key = f"oxide:{cluster}:epoch"
        self.timing = ElectionTiming(ttl)
        # Deadlines need a clock that does not jump; the reactor's is wall time.
        self._now = monotonic or reactor.seconds
        self._leading = False
        self._value: str | None = None
        self._deadline = 0.0
        self._active_after = 0.0
        self._activate_call: IDelayedCall | None = None
        self.token: int | None = None
        self.since: float | None = None
        self.highest_token = 0
        self._known: tuple[str, int, float] | None = None
        self._known_at = 0.0
        self._failures = 0
        self._tick_call: IDelayedCall | None = None
        self._deadline_call: IDelayedCall | None = None
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []

    # -- public surface ------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """True only while the local lease deadline has not passed (checked on each read)."""
        now = self._now()
        return self._leading and self._active_after <= now < self._deadline

    def leader(self) -> dict[str, Any]:
        """This node if it leads, else the leader last read from Redis (for at most a ttl).

        A follower's ``since`` is when it first saw that leader.
        """
        if self.is_leader:
            return {"node_id": self.node_id, "token": self.token, "since": self.since}
        if (not self._leading and self._known is not None
                and self._now() - self._known_at <= self.timing.ttl):
            node_id, token, since = self._known
            return {"node_id": node_id, "token": token, "since": since}
        return {"node_id": None, "token": None, "since": None}

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback(leader())`` whenever the leader this node knows of changes."""
        self._subscribers.append(callback)

    def observe_token(self, token: int) -> bool:
        """Record a fencing token; False when it is older than the highest one seen."""
        if token < self.highest_token:
            return False
        self.highest_token = token
        return True

    def current_token_valid(self, token: int) -> bool:
        """True unless a newer leader's token has been seen (without recording it)."""
        return token >= self.highest_token

    # -- service -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._schedule(0)

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)  # the children stop in _shutdown, after release
        self._cancel("_tick_call")
        value = self._value if self._leading else None
        self._step_down("stopping")
        return defer.Deferred.fromCoroutine(self._shutdown(value))

    async def _shutdown(self, value: str | None) -> None:
        if value is not None:
            try:
                released = self.backend.release(self.key, value)
                released.addTimeout(self.timing.ttl / 2, self._reactor)
                await released
                log.info("released the leader lease {value}", value=value)
            except Exception as error:
                log.warn("could not release the leader lease ({error}); it expires by itself",
                         error=error)
        try:
            await self.backend.close()
        except Exception:
            log.failure("closing the Redis connection failed")
        await service.MultiService.stopService(self)

    # -- the loop ------------------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        self._cancel("_tick_call")
        if self.running:
            self._tick_call = self._reactor.callLater(max(0.0, delay), self._tick)

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        setattr(self, name, None)
        if call is not None and call.active():
            call.cancel()

    def _tick(self) -> None:
        """One step; whatever happens, the next one is scheduled (no loop dies for good)."""
        self._tick_call = None
        step = defer.Deferred.fromCoroutine(self._step())
        step.addErrback(self._unexpected)
        step.addCallback(self._schedule)

    def _unexpected(self, failure: Failure) -> float:
        log.failure("election step failed", failure)
        return self.timing.max_backoff

    async def _step(self) -> float:
        """Renew (leader) or watch and try to acquire (follower); returns the next delay."""
        started = self._now()
        try:
            if self._check_deadline():
                await self._renew()
                return max(0.0, started + self.timing.renew_interval - self._now())
            await self._follow()
        except Exception as error:
            return self._failed(error)
        if self._failures:
            log.info("Redis reachable again after {count} failed attempts",
                     count=self._failures)
            self._failures = 0
        return self.timing.poll_interval

    def _failed(self, error: Exception) -> float:
        self._failures += 1
        if self._failures == 1:
            log.warn("Redis election call failed: {error!r}; retrying with backoff",
                     error=error)
        if self._leading:
            # Retry at once-ish: the lease is still ours until the deadline.
            return self.timing.poll_interval
        if self._known is not None and self._now() - self._known_at > self.timing.ttl:
            self._learn(None)
        return min(self.timing.poll_interval * 2 ** (self._failures - 1),
                   self.timing.max_backoff)

    async def _renew(self) -> None:
        value = self._value
        assert value is not None
        sent = self._now()
        renewed = await self.backend.renew(self.key, value, self.timing.ttl_ms)
        if not self._leading or self._value != value:
            return
        if not renewed:
            self._step_down("the lease is gone or held by another node")
        elif self._now() >= self._deadline:
            self._step_down("the renew reply came after the lease deadline")
        else:
            self._set_deadline(sent + self.timing.ttl - self.timing.margin)

    async def _follow(self) -> None:
        current = await self.backend.get(self.key)
        if current is not None:
            parsed = parse_value(current)
            if parsed is None:
                log.warn("ignoring unexpected leader value {value!r}", value=current)
                return
            node_id, token = parsed
            self.observe_token(token)
            if node_id == self.node_id:
                # Our own lease outlived our local deadline: free it for a fresh election.
                await self.backend.release(self.key, current)
                self._learn(None)
            else:
                self._learn((node_id, token))
            return
        token, fresh = await self.backend.next_token(self.epoch_key, self.highest_token,
                                                     self.timing.ttl_ms)
        # A new or lost epoch means Redis may have lost a live lease: the old leader keeps
        # leading until its own deadline, at most a ttl from now. Hold the key that long.
        quiet_until = self._now() + self.timing.ttl if fresh else 0.0
        value = f"{self.node_id}:{token}"
        sent = self._now()
        acquired = await self.backend.acquire(self.key, value, self.timing.ttl_ms)
        if not acquired:
            # Lost the race: no lease ever held this token, so it fences nobody. Observing
            # it would refuse the winner's (lower) token here for as long as it leads.
            return
        self.observe_token(token)
        deadline = sent + self.timing.ttl - self.timing.margin
        if not self.running or self._now() >= deadline:
            await self.backend.release(self.key, value)
            return
        self._become_leader(token, value, deadline, quiet_until)

    # -- state changes -------------------------------------------------------------------

    def _check_deadline(self) -> bool:
        """Step down if the deadline passed; True while this node still leads."""
        if self._leading and self._now() >= self._deadline:
            self._step_down("the lease deadline passed without a successful renew")
        return self._leading

    def _on_deadline(self) -> None:
        self._deadline_call = None
        try:
            self._check_deadline()
        except Exception:
            log.failure("stepping down at the deadline failed")

    def _set_deadline(self, deadline: float) -> None:
        self._deadline = max(self._deadline, deadline)
        self._cancel("_deadline_call")
        self._deadline_call = self._reactor.callLater(
            max(0.0, self._deadline - self._now()), self._on_deadline)

    def _become_leader(self, token: int, value: str, deadline: float,
                       quiet_until: float = 0.0) -> None:
        self._leading = True
        self._value = value
        self.token = token
        self._deadline = deadline
        self._active_after = quiet_until
        self._set_deadline(deadline)
        wait = quiet_until - self._now()
        if wait > 0:
            log.info("holding the lease with token {token}; leading in {wait:.2f} s, once "
                     "any lease lost with Redis's data has run out", token=token, wait=wait)
            self._activate_call = self._reactor.callLater(wait, self._activate)
        else:
            self._activate()

    def _activate(self) -> None:
        self._activate_call = None
        try:
            if not self._check_deadline():
                return
            self.since = self._reactor.seconds()
            log.info("this node leads with token {token}", token=self.token)
            assert self.token is not None
            self._learn((self.node_id, self.token))
        except Exception:
            log.failure("taking up leadership failed")

    def _step_down(self, reason: str) -> None:
        self._cancel("_deadline_call")
        self._cancel("_activate_call")
        if not self._leading:
            return
        self._leading = False
        self._value = None
        self._deadline = 0.0
        log.warn("this node stopped leading (token {token}): {reason}",
                 token=self.token, reason=reason)
        self._learn(None)

    def _learn(self, leader: tuple[str, int] | None) -> None:
        """Remember the current leader; tell subscribers when it changed."""
        before = self._known
        if leader is None:
            self._known = None
        else:
            self._known_at = self._now()
            if before is None or before[:2] != leader:
                self._known = (*leader, self._reactor.seconds())
        if (before and before[:2]) != (self._known and self._known[:2]):
            self._notify()

    def _notify(self) -> None:
        current = self.leader()
        for callback in list(self._subscribers):
            try:
                callback(dict(current))
            except Exception:
                log.failure("leader subscriber {callback} failed", callback=callback)


# -- Redis ----------------------------------------------------------------------------

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_NEXT_TOKEN = """
local n = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if n == 1 or n <= floor then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
end
if n <= floor then
  n = floor + 1
  redis.call('SET', KEYS[1], string.format('%d', n))
end
return {n, redis.call('EXISTS', KEYS[2])}
"""


@implementer(IElectionBackend)
class RedisLockBackend:
    """:class:`LockBackend` as scripts on one Redis connection (its timeouts, its
    reconnects: ``redis_connection.RedisConnection``, a service of its own)."""

    def __init__(self, redis: RedisCommands) -> None:
        self._redis = redis

    def command(self, *command: Any) -> defer.Deferred[Any]:
        """Any Redis command on this connection."""
        return self._redis.command(*command)

    def acquire(self, key: str, value: str, ttl_ms: int) -> defer.Deferred[bool]:
        return defer.Deferred.fromCoroutine(self._acquire(key, value, ttl_ms))

    async def _acquire(self, key: str, value: str, ttl_ms: int) -> bool:
        return await self.command("SET", key, value, "PX", ttl_ms, "NX") == "OK"

    def renew(self, key: str, value: str, ttl_ms: int) -> defer.Deferred[bool]:
        return defer.Deferred.fromCoroutine(self._eval_true(_RENEW, key, value, ttl_ms))

    def release(self, key: str, value: str) -> defer.Deferred[bool]:
        return defer.Deferred.fromCoroutine(self._eval_true(_RELEASE, key, value))

    async def _eval_true(self, script: str, key: str, *args: Any) -> bool:
        return bool(int(await self.command("EVAL", script, 1, key, *args)))

    def get(self, key: str) -> defer.Deferred[str | None]:
        return defer.Deferred.fromCoroutine(self._get(key))

    async def _get(self, key: str) -> str | None:
        value = await self.command("GET", key)
        return None if value is None else str(value)

    def next_token(self, key: str, floor: int,
                   quiet_ms: int) -> defer.Deferred[tuple[int, bool]]:
        return defer.Deferred.fromCoroutine(self._next_token(key, floor, quiet_ms))

    async def _next_token(self, key: str, floor: int, quiet_ms: int) -> tuple[int, bool]:
        token, fresh = await self.command("EVAL", _NEXT_TOKEN, 2, key, key + ":quiet",
                                          floor, quiet_ms)
        return int(token), bool(int(fresh))

    def close(self) -> defer.Deferred[None]:
        """Nothing to do: the connection is a service and stops with its parent (the
        elector, after it released its lease)."""
        return defer.succeed(None)


def lease_elector(reactor: Any, node_id: str, backend: LockBackend, cluster: str,
                  ttl: float) -> RedisElector:
    """Leader election on any IElectionBackend, with monotonic deadlines: what an
    ``election`` provider's factory returns around its backend."""
    return RedisElector(reactor, node_id, backend, cluster=cluster, ttl=ttl,
                        monotonic=time.monotonic)


def redis_elector(reactor: Any, node_id: str, url: str, cluster: str,
                  ttl: float) -> RedisElector:
    """The production elector: Redis backend, monotonic deadlines, the real reactor. Its
    connection, with a lease-sized timeout, is its child service: it starts before the
    first election step and stops after the lease is released."""
    timing = ElectionTiming(ttl)
    connection = RedisConnection(reactor, RedisAddress.parse(url), timeout=max(0.2, ttl / 2),
                                 max_backoff=timing.max_backoff)
    elector = lease_elector(reactor, node_id, RedisLockBackend(connection), cluster, ttl)
    connection.setServiceParent(elector)
    return elector

"""RedisElector on a task.Clock with a fake lock store: leases, deadlines, late replies."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import Clock

from oxide_cluster.election import (
    ElectionTiming,
    RedisAddress,
    RedisElector,
    StandaloneElector,
    parse_value,
)

TTL = 2.0
KEY = "oxide:test:leader"
EPOCH = "oxide:test:epoch"
STEP = 0.05


class FakeStore:
    """What Redis holds: values with expiry times on the shared Clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.data: dict[str, tuple[str, float | None]] = {}

    def read(self, key: str) -> str | None:
        entry = self.data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and self.clock.seconds() >= expires:
            del self.data[key]
            return None
        return value

    def expires(self, key: str) -> float | None:
        return self.data[key][1] if self.read(key) is not None else None

    def write(self, key: str, value: str, ttl_ms: int | None = None) -> None:
        expires = None if ttl_ms is None else self.clock.seconds() + ttl_ms / 1000
        self.data[key] = (value, expires)

    def flush(self) -> None:
        self.data.clear()


class FakeBackend:
    """A LockBackend over a FakeStore that can be down, raise, or hold its replies."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.down = False
        self.broken = False
        self.hold = False
        self.held: list[tuple[defer.Deferred[Any], Any]] = []
        self.calls: list[tuple[float, str]] = []
        self.closed = False

    def _reply(self, name: str, operation: Callable[[], Any]) -> defer.Deferred[Any]:
        self.calls.append((self.store.clock.seconds(), name))
        if self.broken:
            raise RuntimeError("backend bug")
        if self.down:
            return defer.fail(ConnectionError("Redis is down"))
        result = operation()  # Redis applies the command when it arrives...
        if self.hold:  # ...but the reply may come late
            waiting: defer.Deferred[Any] = defer.Deferred()
            self.held.append((waiting, result))
            return waiting
        return defer.succeed(result)

    def deliver_held(self) -> None:
        held, self.held = self.held, []
        for waiting, result in held:
            waiting.callback(result)

    def acquire(self, key: str, value: str, ttl_ms: int) -> defer.Deferred[bool]:
        def op() -> bool:
            if self.store.read(key) is not None:
                return False
            self.store.write(key, value, ttl_ms)
            return True
        return self._reply("acquire", op)

    def renew(self, key: str, value: str, ttl_ms: int) -> defer.Deferred[bool]:
        def op() -> bool:
            if self.store.read(key) != value:
                return False
            self.store.write(key, value, ttl_ms)
            return True
        return self._reply("renew", op)

    def release(self, key: str, value: str) -> defer.Deferred[bool]:
        def op() -> bool:
            if self.store.read(key) != value:
                return False
            del self.store.data[key]
            return True
        return self._reply("release", op)

    def get(self, key: str) -> defer.Deferred[str | None]:
        return self._reply("get", lambda: self.store.read(key))

    def next_token(self, key: str, floor: int,
                   quiet_ms: int) -> defer.Deferred[tuple[int, bool]]:
        def op() -> tuple[int, bool]:
            before = self.store.read(key)
            number = int(before or 0) + 1
            if before is None or number <= floor:
                self.store.write(key + ":quiet", "1", quiet_ms)
            number = max(number, floor + 1)
            self.store.write(key, str(number))
            return number, self.store.read(key + ":quiet") is not None
        return self._reply("next_token", op)

    def close(self) -> defer.Deferred[None]:
        self.closed = True
        return defer.succeed(None)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> FakeStore:
    """An established cluster's Redis: the epoch exists (a new one is tested apart)."""
    store = FakeStore(clock)
    store.write(EPOCH, "0")
    return store


def elector(clock: Clock, store: FakeStore, node_id: str) -> tuple[RedisElector, FakeBackend]:
    backend = FakeBackend(store)
    return RedisElector(clock, node_id, backend, cluster="test", ttl=TTL), backend


def run(clock: Clock, seconds: float, check: Callable[[], None] | None = None) -> None:
    """Advance in small steps (as a reactor would), calling ``check`` after each."""
    for _ in range(round(seconds / STEP)):
        clock.advance(STEP)
        if check is not None:
            check()


def leaders(*electors: RedisElector) -> list[str]:
    return [e.node_id for e in electors if e.is_leader]


def test_acquires_with_token_1_renews_and_releases_on_stop(clock, store):
    a, backend = elector(clock, store, "a")
    a.startService()
    clock.advance(0)
    assert a.is_leader and a.token == 1
    assert store.read(KEY) == "a:1"
    assert a.leader() == {"node_id": "a", "token": 1, "since": 0.0}
    run(clock, 10, lambda: assert_true(a.is_leader))
    renews = [t for t, name in backend.calls if name == "renew"]
    assert len(renews) >= 10 / ElectionTiming(TTL).renew_interval - 1
    assert a.token == 1
    stopped = a.stopService()
    assert stopped.called
    assert not a.is_leader
    assert store.read(KEY) is None
    assert backend.closed


def assert_true(value: bool) -> None:
    assert value


def test_the_connection_is_a_child_up_before_the_first_step_and_down_after_the_release(
        clock, store):
    """redis_elector makes its connection a child service: the lease must be released
    on it before it closes."""
    a, backend = elector(clock, store, "a")
    seen: list[str] = []

    class Connection(service.Service):
        def startService(self) -> None:
            super().startService()
            seen.append(f"start, {len(backend.calls)} calls")

        def stopService(self) -> defer.Deferred[None]:
            super().stopService()
            seen.append(f"stop, lease {store.read(KEY)}")
            return defer.succeed(None)

    Connection().setServiceParent(a)
    a.startService()
    clock.advance(0)
    assert a.is_leader
    assert a.stopService().called
    assert seen == ["start, 0 calls", "stop, lease None"]


def test_redis_elector_owns_a_connection_service_with_a_lease_sized_timeout():
    from oxide_cluster.election import redis_elector
    from oxide_cluster.redis_connection import RedisConnection

    built = redis_elector(Clock(), "n1", "redis://127.0.0.1:6399/0", "ci", 1.0)
    (connection,) = list(built)
    assert isinstance(connection, RedisConnection)
    assert connection.timeout == 0.5 and connection.address.port == 6399


def test_second_elector_does_not_acquire_while_the_first_renews(clock, store):
    a, _ = elector(clock, store, "a")
    b, _ = elector(clock, store, "b")
    a.startService()
    clock.advance(0)
    b.startService()
    run(clock, 10, lambda: assert_true(leaders(a, b) == ["a"]))
    assert b.leader()["node_id"] == "a" and b.leader()["token"] == 1


def test_killed_leader_is_replaced_after_the_ttl_with_a_larger_token(clock, store):
    a, _ = elector(clock, store, "a")
    b, _ = elector(clock, store, "b")
    a.startService()
    clock.advance(0)
    b.startService()
    run(clock, 1)
    # kill -9: a's timers never run again and nothing is released.
    a._cancel("_tick_call")
    a._cancel("_deadline_call")
    expires = store.expires(KEY)
    assert expires is not None
    taken_at: list[float] = []

    def check() -> None:
        assert leaders(a, b) != ["a", "b"]
        if b.is_leader and not taken_at:
            taken_at.append(clock.seconds())

    run(clock, 3, check)
    assert b.is_leader and b.token is not None and b.token > 1
    assert expires <= taken_at[0] <= expires + ElectionTiming(TTL).poll_interval + STEP
    assert b.observe_token(b.token) and not b.current_token_valid(1)


def test_stalled_leader_steps_down_before_the_key_would_expire(clock, store):
    a, backend = elector(clock, store, "a")
    a.startService()
    clock.advance(0)
    run(clock, 1)
    backend.hold = True  # renews reach Redis late or never answer
    expires = store.expires(KEY)
    assert expires is not None
    while a.is_leader:
        clock.advance(STEP)
        assert store.read(KEY) == "a:1", "the key expired while a still led"
    assert clock.seconds() <= expires - TTL / 4 + STEP


def test_late_renew_reply_does_not_restore_leadership(clock, store):
    a, backend = elector(clock, store, "a")
    a.startService()
    clock.advance(0)
    backend.hold = True
    run(clock, TTL)
    assert not a.is_leader
    assert backend.held, "a renew should be waiting for its reply"
    backend.hold = False
    backend.deliver_held()  # True replies, after the deadline
    assert not a.is_leader
    assert a.leader()["node_id"] is None


def test_is_leader_is_false_after_the_deadline_even_if_no_timer_ran(clock, store):
    a, _ = elector(clock, store, "a")
    a.startService()
    clock.advance(0)
    assert a.is_leader
    clock.rightNow += TTL  # SIGSTOP/SIGCONT: time moved, timers have not run yet
    assert not a.is_leader
    assert a.leader() == {"node_id": None, "token": None, "since": None}


def test_sigcont_overdue_renew_tick_steps_down_instead_of_renewing(clock, store):
    a, backend = elector(clock, store, "a")
    b, _ = elector(clock, store, "b")
    a.startService()
    clock.advance(0)
    b.startService()
    run(clock, 1)
    # SIGSTOP a: its timers do not run while b's do.
    a._cancel("_tick_call")
    a._cancel("_deadline_call")
    run(clock, 5)
    assert b.is_leader and b.token == 2
    a_calls = len(backend.calls)
    a._tick()  # SIGCONT: the overdue renew tick runs first
    assert not a.is_leader
    assert "renew" not in [name for _, name in backend.calls[a_calls:]]
    assert a.leader()["node_id"] == "b" and a.leader()["token"] == 2
    run(clock, 2, lambda: assert_true(leaders(a, b) == ["b"]))


def test_backend_errors_mean_no_leader_backoff_and_recovery(clock, store):
    a, backend = elector(clock, store, "a")
    backend.down = True
    a.startService()
    run(clock, 10, lambda: assert_true(not a.is_leader))
    times = [t for t, _ in backend.calls]
    gaps = [round(later - earlier, 2) for earlier, later in itertools.pairwise(times)]
    assert gaps[:4] == sorted(gaps[:4]) and gaps[0] < gaps[3]
    assert max(gaps) <= ElectionTiming(TTL).max_backoff + STEP
    backend.down = False
    run(clock, ElectionTiming(TTL).max_backoff + 0.1)
    assert a.is_leader and a.token == 1


def test_leader_loses_redis_steps_down_at_its_deadline(clock, store):
    a, backend = elector(clock, store, "a")
    a.startService()
    clock.advance(0)
    backend.down = True
    started = clock.seconds()
    while a.is_leader:
        clock.advance(STEP)
    assert clock.seconds() - started <= TTL - TTL / 4 + STEP
    run(clock, 5, lambda: assert_true(not a.is_leader))
    assert a.leader()["node_id"] is None


def test_no_exception_escapes_a_timer_callback(clock, store):
    a, backend = elector(clock, store, "a")
    a.subscribe(lambda event: 1 / 0)
    a.startService()
    clock.advance(0)
    assert a.is_leader
    backend.broken = True
    run(clock, 5)  # would raise out of Clock.advance if a callback raised
    assert not a.is_leader
    backend.broken = False
    run(clock, 3)
    assert a.is_leader and a.token == 2


def test_redis_restart_gives_a_new_leader_with_a_larger_token(clock, store):
    a, _ = elector(clock, store, "a")
    b, _ = elector(clock, store, "b")
    a.startService()
    clock.advance(0)
    b.startService()
    run(clock, 1)
    assert a.token == 1 and b.leader()["token"] == 1
    store.flush()  # a non-persistent Redis restarted: key and epoch are gone
    run(clock, 3.5, lambda: assert_true(len(leaders(a, b)) <= 1))
    (new,) = [e for e in (a, b) if e.is_leader]
    assert new.token is not None and new.token > 1
    other = b if new is a else a
    assert other.leader()["token"] == new.token


def test_lost_epoch_holds_the_key_a_ttl_before_leading(clock, store):
    a, a_backend = elector(clock, store, "a")
    b, _ = elector(clock, store, "b")
    a.startService()
    clock.advance(0)
    b.startService()
    run(clock, 0.5)
    a_backend.hold = True  # a stalls: it keeps leading until its local deadline
    store.flush()
    became: list[float] = []

    def check() -> None:
        assert len(leaders(a, b)) <= 1
        if b.is_leader and not became:
            became.append(clock.seconds())

    flushed = clock.seconds()
    run(clock, 3, check)
    assert store.read(KEY) == "b:2"
    assert became and became[0] - flushed >= TTL
    assert not a.is_leader


def test_first_leader_of_a_new_redis_waits_one_ttl(clock):
    store = FakeStore(clock)
    a, _ = elector(clock, store, "a")
    a.startService()
    run(clock, TTL - STEP)
    assert not a.is_leader and store.read(KEY) == "a:1"
    run(clock, 2 * STEP)
    assert a.is_leader and a.token == 1


def test_own_stale_lease_is_released_and_reacquired_with_a_new_token(clock, store):
    a, backend = elector(clock, store, "a")
    a.startService()
    clock.advance(0)
    backend.down = True
    while a.is_leader:
        clock.advance(STEP)
    assert store.read(KEY) == "a:1"  # the lease outlives a's own deadline
    backend.down = False
    run(clock, 3)
    assert a.is_leader and a.token is not None and a.token > 1


def test_subscribers_hear_every_leader_change(clock, store):
    events: list[dict[str, Any]] = []
    a, _ = elector(clock, store, "a")
    b, _ = elector(clock, store, "b")
    b.subscribe(events.append)
    a.startService()
    clock.advance(0)
    b.startService()
    run(clock, 1)
    a.stopService()
    run(clock, 1)
    assert [(e["node_id"], e["token"]) for e in events] == [("a", 1), ("b", 2)]


def test_clean_stop_hands_over_within_a_poll_interval(clock, store):
    a, _ = elector(clock, store, "a")
    b, _ = elector(clock, store, "b")
    a.startService()
    clock.advance(0)
    b.startService()
    run(clock, 1)
    a.stopService()
    run(clock, ElectionTiming(TTL).poll_interval + STEP)
    assert b.is_leader


def test_a_lost_race_for_the_lease_does_not_fence_out_the_winner(clock, store):
    """Both draw a token (a 1, then b 2) before either sets the key; a sets it. b's
    token was never a lease's: b must still accept the leader's token 1 (placements)."""
    a, a_backend = elector(clock, store, "a")
    b, b_backend = elector(clock, store, "b")
    a_backend.hold = b_backend.hold = True
    a.startService()
    b.startService()
    clock.advance(0)  # both read: no leader
    for _ in range(3):  # then, in turn: next_token (a 1, b 2), acquire (a wins), its reply
        a_backend.deliver_held()
        b_backend.deliver_held()
    a_backend.hold = b_backend.hold = False
    a_backend.deliver_held()
    b_backend.deliver_held()
    assert store.read(KEY) == "a:1"
    run(clock, 3, lambda: assert_true(leaders(a, b) == ["a"]))
    assert b.leader() == {"node_id": "a", "token": 1, "since": b.leader()["since"]}
    assert b.current_token_valid(1) and b.observe_token(1)


def test_fencing_tokens():
    a = RedisElector(Clock(), "a", FakeBackend(FakeStore(Clock())))
    assert a.observe_token(3) and a.highest_token == 3
    assert not a.observe_token(2) and a.highest_token == 3
    assert a.current_token_valid(3) and not a.current_token_valid(2)
    standalone = StandaloneElector(Clock(), "s")
    assert standalone.current_token_valid(1)


def test_parse_value_and_redis_url():
    assert parse_value("host-1:ab:7") == ("host-1:ab", 7)
    assert parse_value("nope") is None and parse_value("a:") is None
    assert RedisAddress.parse("redis://:pw@r.example:6380/2") == RedisAddress(
        "r.example", 6380, 2, None, "pw")
    assert RedisAddress.parse("redis://127.0.0.1") == RedisAddress("127.0.0.1")
    with pytest.raises(ValueError):
        RedisAddress.parse("http://x")
    with pytest.raises(ValueError):
        RedisAddress.parse("redis://x/abc")


def test_tap_builds_a_redis_elector_and_publishes_leader_events(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    from oxide_cluster import config as config_module
    from oxide_cluster.tap import build_node
    from oxide_cluster.ws import LiveHub

    config = config_module.load(
        {"redis": "redis://127.0.0.1:6399/0", "state_dir": str(tmp_path), "secret": "s",
         "discovery": False, "listen": "tcp:0", "leader_ttl": "1.5",
         "cluster_name": "ci"}, {})
    top, node = build_node(config, MemoryReactorClock())
    try:
        assert isinstance(node.elector, RedisElector)
        assert node.elector.key == "oxide:ci:leader" and node.elector.timing.ttl == 1.5
        events: list[dict[str, Any]] = []
        (hub,) = [child for child in top if isinstance(child, LiveHub)]
        hub.publish = events.append  # type: ignore[method-assign]
        node.elector._learn(("other-node", 7))
        assert events == [{"type": "leader", "node_id": "other-node", "token": 7,
                           "since": events[0]["since"]}]
        assert events[0]["since"].endswith("Z")
    finally:
        top._lock.release()

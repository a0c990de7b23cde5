"""RedisConnection on a MemoryReactorClock: reconnect with backoff, fail fast while Redis
is down, a timed-out command drops the connection, AUTH/SELECT before any command."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from oxide_cluster.redis_connection import (
    RedisAddress,
    RedisConnection,
    RedisUnavailable,
    retry_policy,
)

TIMEOUT = 1.0


def backoff(attempt: int) -> float:
    return 0.5 * attempt


class Redis:
    """The test's side of the connections the service opens through the memory reactor."""

    def __init__(self, url: str = "redis://127.0.0.1:6379") -> None:
        self.reactor = MemoryReactorClock()
        endpoint = endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", 6379,
                                                timeout=TIMEOUT)
        self.connection = RedisConnection(self.reactor, RedisAddress.parse(url),
                                          timeout=TIMEOUT, endpoint=endpoint,
                                          retry=backoff)
        self.protocol: Any = None
        self.transport: StringTransport | None = None

    @property
    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    def accept(self) -> StringTransport:
        factory = self.reactor.tcpClients[-1][2]
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        return self.transport

    def refuse(self) -> None:
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def reply(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> bytes:
        assert self.transport is not None
        value = self.transport.value()
        self.transport.clear()
        return value

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def test_a_command_goes_out_on_the_connection_and_its_reply_comes_back():
    redis = Redis()
    redis.connection.startService()
    redis.accept()
    assert redis.connection.connected
    reply = redis.connection.command("GET", "k")
    assert b"GET" in redis.sent()
    redis.reply(b"$1\r\nv\r\n")
    assert _result(reply) == "v"
    number = redis.connection.command("INCR", "n")
    redis.reply(b":7\r\n")
    assert _result(number) == 7


def test_a_command_during_the_first_attempt_waits_for_it_and_fails_if_it_fails():
    redis = Redis()
    redis.connection.startService()
    waiting = redis.connection.command("PING")
    assert not waiting.called
    redis.refuse()
    assert isinstance(_failure(waiting).value, ConnectionRefusedError)

    redis = Redis()
    redis.connection.startService()
    waiting = redis.connection.command("PING")
    redis.accept()
    assert b"PING" in redis.sent()
    redis.reply(b"+PONG\r\n")
    assert _result(waiting) == "PONG"


def test_a_command_while_redis_is_down_fails_at_once():
    redis = Redis()
    redis.connection.startService()
    redis.refuse()
    error = _failure(redis.connection.command("PING")).value
    assert isinstance(error, RedisUnavailable) and "refused" in str(error)
    assert redis.attempts == 1  # nothing retried before the backoff


def test_a_lost_connection_is_made_again_after_the_backoff():
    redis = Redis()
    redis.connection.startService()
    redis.accept()
    redis.lose()
    assert not redis.connection.connected
    assert isinstance(_failure(redis.connection.command("PING")).value, RedisUnavailable)
    redis.reactor.advance(backoff(1) - 0.01)
    assert redis.attempts == 1
    redis.reactor.advance(0.01)
    assert redis.attempts == 2
    redis.refuse()  # still down: the next wait is longer
    redis.reactor.advance(backoff(2) - 0.01)
    assert redis.attempts == 2
    redis.reactor.advance(0.01)
    assert redis.attempts == 3
    redis.accept()
    assert redis.connection.connected and redis.connection.reconnects == 1
    reply = redis.connection.command("PING")
    redis.reply(b"+PONG\r\n")
    assert _result(reply) == "PONG"


def test_a_timed_out_command_drops_the_connection_and_later_ones_fail_fast():
    redis = Redis()
    redis.connection.startService()
    transport = redis.accept()
    late = redis.connection.command("GET", "a")
    redis.reactor.advance(TIMEOUT)
    assert isinstance(_failure(late).value, defer.TimeoutError)
    # A reply arriving now would answer the next command: the connection is dropped.
    assert transport.disconnecting
    assert isinstance(_failure(redis.connection.command("GET", "b")).value,
                      RedisUnavailable)
    redis.lose()
    redis.reactor.advance(backoff(1))
    assert redis.attempts == 2


def test_auth_and_select_run_before_any_command():
    redis = Redis("redis://user:secret@127.0.0.1:6379/3")
    redis.connection.startService()
    waiting = redis.connection.command("PING")
    redis.accept()
    assert b"AUTH" in (auth := redis.sent()) and b"secret" in auth and b"user" in auth
    redis.reply(b"+OK\r\n")
    assert b"SELECT" in redis.sent()
    assert not waiting.called
    redis.reply(b"+OK\r\n")
    assert b"PING" in redis.sent()
    redis.reply(b"+PONG\r\n")
    assert _result(waiting) == "PONG"


def test_a_refused_auth_is_a_failed_attempt_retried_with_backoff():
    redis = Redis("redis://:wrong@127.0.0.1:6379")
    redis.connection.startService()
    waiting = redis.connection.command("PING")
    transport = redis.accept()
    redis.reply(b"-WRONGPASS invalid password\r\n")
    assert not redis.connection.connected
    assert "WRONGPASS" in str(_failure(waiting).value)
    assert transport.disconnecting
    redis.lose()
    assert isinstance(_failure(redis.connection.command("PING")).value, RedisUnavailable)
    redis.reactor.advance(backoff(1))
    assert redis.attempts == 2
    transport = redis.accept()
    redis.reply(b"-WRONGPASS invalid password\r\n")
    redis.lose()
    # Each refusal counts: the wait grows although every TCP connect succeeded.
    redis.reactor.advance(backoff(2) - 0.01)
    assert redis.attempts == 2
    redis.reactor.advance(0.01)
    assert redis.attempts == 3


def test_stop_closes_the_connection_and_commands_then_fail():
    redis = Redis()
    redis.connection.startService()
    transport = redis.accept()
    stopped = redis.connection.stopService()
    assert transport.disconnecting and not stopped.called
    redis.lose()
    assert _result(stopped) is None
    assert isinstance(_failure(redis.connection.command("PING")).value, RedisUnavailable)
    redis.reactor.advance(60)
    assert redis.attempts == 1  # a stopped service does not reconnect


def test_before_start_a_command_fails_instead_of_waiting_forever():
    redis = Redis()
    assert isinstance(_failure(redis.connection.command("PING")).value, RedisUnavailable)


def test_the_default_backoff_doubles_from_a_fifth_of_a_second_up_to_the_cap():
    policy = retry_policy(2.0)
    delays = [policy(attempt) for attempt in range(1, 8)]
    for delay, base in zip(delays, [0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0], strict=True):
        assert base <= delay <= base + 0.1


def _result(deferred: defer.Deferred[Any]) -> Any:
    from twisted.trial.unittest import SynchronousTestCase

    return SynchronousTestCase().successResultOf(deferred)


def _failure(deferred: defer.Deferred[Any]) -> Failure:
    from twisted.trial.unittest import SynchronousTestCase

    return SynchronousTestCase().failureResultOf(deferred)


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends():
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        redis = Redis()
        redis.connection.startService()
        redis.accept()
        redis.lose()
        for attempt in range(1, 6):  # five failed reconnects
            redis.reactor.advance(backoff(attempt))
            redis.refuse()
        redis.reactor.advance(backoff(6))
        redis.accept()
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(event) for event in events]
    assert redis.attempts == 7
    assert not [line for line in lines if "Scheduling retry" in line], lines
    assert len([line for line in lines if "lost the connection to Redis" in line]) == 1, lines
    assert not [line for line in lines if "cannot reach Redis" in line], lines
    assert len([line for line in lines if "reachable again" in line]) == 1, lines

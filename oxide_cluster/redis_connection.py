"""One Redis connection as a service: a ``ClientService`` keeps it open, reconnecting with
backoff, and every command is timed by the injected reactor.

txredisapi's own factories use the global reactor and convert numeric replies; here the
protocol is connected through an endpoint of the injected reactor and numbers are not
converted. While Redis is known to be down (the last attempt failed, or the connection was
lost and is not back yet) a command fails at once with :class:`RedisUnavailable` instead of
queueing behind the reconnect: the elector must see its renews fail in time to step down,
and a request must get its 503 now. A command that times out drops the connection, since a
late reply would be paired with the next command.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import attrs
from twisted.application import internet, service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer, provider

log = Logger()


@attrs.frozen
class RedisAddress:
    """Where Redis is: ``redis://[[user]:password@]host[:port][/db]``."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"Redis URL must start with redis:// (got {url!r})")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"bad port in Redis URL {url!r}") from None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"Redis database must be a number (got {path!r})")
        return cls(host=parts.hostname or "localhost", port=port, db=int(path or 0),
                   username=unquote(parts.username) if parts.username else None,
                   password=unquote(parts.password) if parts.password else None)


class RedisCommands(Protocol):
    """What the Redis stores need of a connection (:class:`RedisConnection`)."""

    def command(self, *command: Any) -> defer.Deferred[Any]: ...


class RedisUnavailable(ConnectionError):
    """Redis is not reachable now (the connection service is reconnecting or stopped)."""


def retry_policy(max_delay: float = 2.0, initial: float = 0.1) -> Callable[[int], float]:
    """Reconnect after 0.2 s, 0.4 s, … up to ``max_delay``, plus up to ``initial`` of
    jitter (``backoffPolicy``'s default jitter adds up to a whole second)."""
    return internet.backoffPolicy(initialDelay=initial, maxDelay=max_delay, factor=2.0,
                                  jitter=lambda: random.random() * initial)


@functools.cache
def _protocol_class() -> Any:
    import txredisapi

    class RedisProtocol(txredisapi.BaseRedisProtocol):
        """txredisapi's protocol on our reactor (not the global one its class holds),
        telling its connection when it is lost."""

        def __init__(self, call_later: Callable[..., Any],
                     on_lost: Callable[[Any, Failure], None], **options: Any) -> None:
            super().__init__(**options)
            self.callLater = call_later
            self.on_lost = on_lost

        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            self.on_lost(self, why)

    return RedisProtocol


class _ProtocolFactory(Factory):
    """Builds our protocols; not noisy, since attempts repeat while Redis is down."""

    noisy = False

    def __init__(self, reactor: Any, on_lost: Callable[[Any, Failure], None]) -> None:
        self._reactor = reactor
        self._on_lost = on_lost
        self.built: Any = None  # the latest protocol (ClientService hands on a proxy of it)

    def buildProtocol(self, addr: Any) -> Any:
        protocol = _protocol_class()(self._reactor.callLater, self._on_lost,
                                     charset="utf-8", convertNumbers=False)
        protocol.factory = self  # as Factory.buildProtocol does
        self.built = protocol
        return protocol


@provider(ILogObserver)
def _without_retry_lines(event: LogEvent) -> None:
    """ClientService's events minus its line per retry: while Redis is down that was two
    lines every 2 s per connection; :class:`RedisConnection` says once that Redis is
    unreachable and once that it is back."""
    if not str(event.get("log_format", "")).startswith("Scheduling retry"):
        globalLogPublisher(event)


class _QuietClientService(internet.ClientService):
    _log = Logger(namespace="twisted.application.internet.ClientService",
                  observer=_without_retry_lines)


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """The endpoint, telling the connection when an attempt fails (ClientService only
    tells ``whenConnected`` waiters, and commands must know without waiting)."""

    def __init__(self, endpoint: Any, failed: Callable[[Failure], None],
                 address: RedisAddress) -> None:
        self._endpoint = endpoint
        self._failed = failed
        self._address = address

    def __repr__(self) -> str:
        # ClientService logs each retry with this ("... to connect Redis at h:p in 0.4 s").
        return f"Redis at {self._address.host}:{self._address.port}"

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        connecting: defer.Deferred[Any] = self._endpoint.connect(factory)

        def failed(failure: Failure) -> Failure:
            self._failed(failure)
            return failure
        return connecting.addErrback(failed)


class RedisConnection(service.Service):
    """One txredisapi connection owned by a ``ClientService``; ``command`` runs one
    command on it with a timeout. AUTH and SELECT run in ``prepareConnection``."""

    def __init__(self, reactor: Any, address: RedisAddress, timeout: float = 1.0, *,
                 max_backoff: float = 2.0, endpoint: Any = None,
                 retry: Callable[[int], float] | None = None) -> None:
        self._reactor = reactor
        self.address = address
        self.timeout = timeout
        if endpoint is None:
            endpoint = endpoints.HostnameEndpoint(reactor, address.host, address.port,
                                                  timeout=timeout)
        self._factory = _ProtocolFactory(reactor, self._lost)
        observed: Any = _ObservedEndpoint(endpoint, self._attempt_failed, address)  # zope: no mypy
        factory: Any = self._factory
        self._retry = retry or retry_policy(max_backoff)
        self._rejected = 0  # connections refused by AUTH/SELECT in a row
        self._client = _QuietClientService(
            observed, factory, retryPolicy=self._delay, clock=reactor,
            prepareConnection=self._prepare)
        self._protocol: Any = None  # connected and prepared
        self._down: str | None = None  # why Redis is unreachable; None: connected/first try
        self.reconnects = 0

    def _delay(self, attempt: int) -> float:
        return self._retry(max(attempt, self._rejected))

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    # -- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._down = None
        self._client.startService()

    def stopService(self) -> defer.Deferred[None]:
        if not self.running:
            return defer.succeed(None)
        super().stopService()
        protocol = self._protocol
        stopped: defer.Deferred[None] = self._client.stopService()
        if protocol is not None and protocol.transport is not None:
            # loseConnection waits for unsent bytes; Redis not reading must not hang stop.
            abort = self._reactor.callLater(self.timeout, protocol.transport.abortConnection)

            def cancel_abort(result: Any) -> Any:
                if abort.active():
                    abort.cancel()
                return result
            stopped.addBoth(cancel_abort)
        return stopped

    # -- connection events -----------------------------------------------------------------

    async def _prepare(self, proxy: Any) -> None:
        """AUTH and SELECT. A refusal drops the connection but does not fail here:
        ClientService does not close a connection it rejects, and the loss of one it
        rejected finds it in a state with no transition for it. So the rejection counts
        in the backoff instead (as txredisapi's own ClientService use does)."""
        protocol = self._factory.built
        try:
            if self.address.password is not None:
                auth = ("AUTH", self.address.username, self.address.password)
                await self._timed(protocol, *(a for a in auth if a is not None))
            if self.address.db:
                await self._timed(protocol, "SELECT", self.address.db)
        except Exception as error:
            self._rejected += 1
            self._attempt_failed(Failure(error))
            if protocol.transport is not None:
                protocol.transport.abortConnection()
            return
        if self._down is not None:
            self.reconnects += 1
            log.info("Redis at {host}:{port} reachable again", host=self.address.host,
                     port=self.address.port)
        self._rejected = 0
        self._protocol = protocol
        self._down = None

    def _attempt_failed(self, failure: Failure) -> None:
        if not self.running:
            return  # stopping cancelled the attempt
        if self._down is None:
            log.warn("cannot reach Redis at {host}:{port}: {error}; retrying with backoff",
                     host=self.address.host, port=self.address.port,
                     error=failure.getErrorMessage())
        self._down = failure.getErrorMessage() or repr(failure.value)

    def _lost(self, protocol: Any, why: Failure) -> None:
        if self._protocol is not None and protocol is not self._protocol:
            return  # not ours: an attempt that failed in prepare, already counted
        self._protocol = None
        if self.running and self._down is None:
            self._down = f"connection lost ({why.getErrorMessage()})"
            log.warn("lost the connection to Redis at {host}:{port} ({error}); reconnecting "
                     "with backoff", host=self.address.host, port=self.address.port,
                     error=why.getErrorMessage())

    # -- commands --------------------------------------------------------------------------

    def _timed(self, protocol: Any, *command: Any) -> defer.Deferred[Any]:
        reply: defer.Deferred[Any] = protocol.execute_command(*command)

        def timed_out(failure: Failure) -> Failure:
            if failure.check(defer.TimeoutError):
                self._lost(protocol, failure)
                if protocol.transport is not None:
                    protocol.transport.abortConnection()
            return failure

        reply.addTimeout(self.timeout, self._reactor)
        reply.addErrback(timed_out)
        return reply

    async def _command(self, command: tuple[Any, ...]) -> Any:
        protocol = self._protocol
        if protocol is None:
            if not self.running:
                raise RedisUnavailable("the Redis connection is not running")
            if self._down is not None:
                raise RedisUnavailable(f"Redis is unreachable: {self._down}")
            # The first attempt since start: its own connect timeout bounds the wait, and
            # it is not cancelled, so nothing stays registered in the ClientService.
            await self._client.whenConnected(failAfterFailures=1)
            protocol = self._protocol
            if protocol is None:  # refused by AUTH/SELECT
                raise RedisUnavailable(f"Redis is unreachable: {self._down}")
        return await self._timed(protocol, *command)

    def command(self, *command: Any) -> defer.Deferred[Any]:
        """Any Redis command; fails with :class:`RedisUnavailable` while Redis is down,
        ``defer.TimeoutError`` after ``timeout`` (and drops the connection)."""
        return defer.Deferred.fromCoroutine(self._command(command))

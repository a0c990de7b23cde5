"""The Redis lock backend's scripts against a real redis-server."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import task

from oxide_cluster.election import RedisLockBackend
from oxide_cluster.redis_connection import RedisAddress, RedisConnection


@pytest_twisted.ensureDeferred
async def test_a_new_epoch_stays_quiet_for_every_acquirer_until_the_lease_could_have_run_out(
        redis):
    from twisted.internet import reactor

    connection = RedisConnection(reactor, RedisAddress.parse(redis.url), timeout=2.0)
    connection.startService()
    backend = RedisLockBackend(connection)
    try:
        first = await backend.next_token("oxide:t:epoch", 5, 300)
        second = await backend.next_token("oxide:t:epoch", 0, 300)
        assert first == (6, True)  # missing epoch: lifted above what this node saw
        assert second == (7, True)  # a later acquirer must wait out the lost lease too
        await task.deferLater(reactor, 0.4, lambda: None)
        assert await backend.next_token("oxide:t:epoch", 0, 300) == (8, False)
        assert await backend.next_token("oxide:t:epoch", 20, 300) == (21, True)
    finally:
        await connection.stopService()

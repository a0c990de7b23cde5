"""``GET /queue``'s read of a deep cluster queue, against a real redis-server: a page reads a
bounded number of index entries and records, in the order the leader's dispatcher has."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import defer, task

from oxide_cluster.cluster_queue import ClusterDispatcher, Outcome, RedisQueueBackend
from oxide_cluster.redis_connection import RedisAddress, RedisConnection

DEPTH = 2000


def shape(index: int) -> tuple[int, str]:
    """A mixed queue: three priorities, one big group and forty small ones."""
    priority = 5 if index % 50 == 0 else (-1 if index % 7 == 0 else 0)
    group = "big" if index % 3 else f"g{index % 40}"
    return priority, group


def record(index: int) -> dict[str, Any]:
    priority, group = shape(index)
    return {"id": f"t{index:05d}", "request": {"command": "true"}, "priority": priority,
            "group": group, "created_at": 0.0, "queue_timeout": 3600.0}


async def dispatcher_view(backend: RedisQueueBackend) -> ClusterDispatcher:
    """A leader that has read the whole queue afresh and has no node to send to."""
    def send(node_id: str, record: dict[str, Any]) -> defer.Deferred[Outcome]:
        raise AssertionError("no node has room: nothing is sent")
    dispatcher = ClusterDispatcher(task.Clock(), backend, is_leader=lambda: True,
                                   candidates=lambda: [], send=send)
    while True:
        before = len(dispatcher)
        await dispatcher.step()
        if len(dispatcher) == before:
            return dispatcher


@pytest_twisted.ensureDeferred
async def test_a_page_of_a_deep_queue_reads_a_bounded_number_of_records_in_dispatch_order(
        redis):
    from twisted.internet import reactor

    connection = RedisConnection(reactor, RedisAddress.parse(redis.url), timeout=10.0)
    connection.startService()
    backend = RedisQueueBackend(connection, "listing")
    try:
        await defer.gatherResults([backend.enqueue(f"t{i:05d}", record(i))
                                   for i in range(DEPTH)])
        leader = await dispatcher_view(backend)
        assert len(leader) == DEPTH

        for limit in (1, 20, 100):
            before = backend.listing_reads
            page = await backend.listing(limit)
            # One index read per task shown, one per group run dry, one per priority
            # band and the counters, then the records: never the 2,000 queued.
            assert page.reads == backend.listing_reads - before
            assert page.reads <= 3 * limit + 4, (limit, page.reads)
            assert [task_id for _, task_id, _ in page.entries] == leader.ordered(limit)
            assert page.queued == DEPTH
            assert page.by_priority == leader.depth_by_priority()

        # Tasks leave from the middle and the heads of groups (claimed, cancelled): the
        # index follows, and the whole listing still matches a fresh leader's order.
        for index in range(0, DEPTH, 9):
            await backend.claim(f"t{index:05d}", "n1")
        for index in range(4, DEPTH, 13):
            await backend.end_queued(f"t{index:05d}", "cancelled", "test", 1.0)
        leader = await dispatcher_view(backend)
        page = await backend.listing(DEPTH)
        assert [task_id for _, task_id, _ in page.entries] == leader.ordered()
        assert page.queued == len(leader)
        assert page.by_priority == leader.depth_by_priority()

        # Emptied, the index and counters leave nothing behind.
        for _, task_id, _ in page.entries:
            await backend.claim(task_id, "n1")
        empty = await backend.listing(100)
        assert (empty.queued, empty.by_priority, empty.entries) == (0, {}, [])
        assert await connection.command("KEYS", "oxide:listing:queue:p:*") == []
        assert await connection.command("EXISTS", "oxide:listing:queue:depth") == 0
    finally:
        await connection.stopService()

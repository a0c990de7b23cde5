"""``--queue-split``'s queue: exactly once, batches that shrink, dead batches returned."""

from __future__ import annotations

import threading

from hypothesis import given
from hypothesis import strategies as st

from oxide_cluster.fanout import Shard
from oxide_cluster.queue_split import FileQueue, batch_sizes, died


def test_batches_start_at_a_quarter_of_a_worker_s_share_and_shrink_toward_the_end():
    sizes = batch_sizes([1.0] * 120, workers=3)
    assert sizes[0] == 10  # 120 / (4 * 3)
    assert sizes[-2] == 5 and sizes[-1] <= 5  # the floor: 120 / (8 * 3), in whole files
    assert sizes == sorted(sizes, reverse=True)
    assert sum(sizes) == 120


@given(st.dictionaries(st.text("abc/._", min_size=1, max_size=8),
                       st.floats(0, 100), max_size=60), st.integers(1, 5),
       st.sets(st.integers(0, 30)))
def test_every_file_is_done_exactly_once_whatever_dies(costs, workers, deaths):
    queue = FileQueue(costs, workers, max_returns=1000)
    done: list[str] = []
    taken = 0
    while (batch := queue.take()) is not None:
        if taken in deaths:
            assert queue.give_back(batch)
        else:
            done.extend(batch.files)
            queue.done(batch)
        taken += 1
    assert sorted(done) == sorted(costs)


def test_a_worker_waits_for_a_batch_that_may_come_back():
    queue = FileQueue({"a": 1.0}, workers=2)
    first = queue.take()
    assert first is not None
    got: list = []
    waiting = threading.Thread(target=lambda: got.append(queue.take()))
    waiting.start()
    waiting.join(0.05)
    assert waiting.is_alive()  # the queue is empty, but "a" is still out
    assert queue.give_back(first)
    waiting.join(5)
    assert got and got[0] is not None and got[0].files == ["a"] and got[0].returns == 1
    queue.done(got[0])
    assert queue.take() is None


def test_a_batch_that_keeps_dying_is_given_up():
    queue = FileQueue({"a": 1.0}, workers=1, max_returns=1)
    batch = queue.take()
    assert batch is not None and queue.give_back(batch)
    again = queue.take()
    assert again is not None and not queue.give_back(again)
    assert queue.take() is None


def test_lost_or_killed_tasks_died_but_failing_or_cancelled_ones_did_not():
    def shard(state, signal=None):
        return Shard(0, 1, [], state=state, signal=signal)
    assert died(shard("lost"))
    assert died(shard("failed", 9))
    assert not died(shard("failed"))
    assert not died(shard("cancelled", 15))
    assert not died(shard("succeeded"))


# -- the ``fanout`` field that marks a task as part of a run ------------------------------


def test_the_fanout_field_is_parsed_kept_on_the_task_and_refused_when_malformed():
    import pytest

    from oxide_cluster.model import RequestError, parse_task_request

    fanout = {"run": "20261202T010203-ab12cd34", "index": 2, "total": 3, "mode": "shards"}
    request = parse_task_request({"command": "true", "fanout": fanout}, 600.0)
    assert request.fanout == fanout
    for bad in ({"run": "x", "index": 0, "total": 1}, {**fanout, "run": "a/b"},
                {**fanout, "index": -1}, {**fanout, "total": 0}, {**fanout, "index": True},
                {**fanout, "mode": "other"}, {**fanout, "extra": 1}, "run"):
        with pytest.raises(RequestError) as caught:
            parse_task_request({"command": "true", "fanout": bad}, 600.0)
        assert caught.value.field.startswith("fanout"), bad

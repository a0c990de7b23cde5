"""``--queue-split``'s queue: exactly once, batches that shrink, dead batches returned."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from oxide_cluster.fanout import Shard
from oxide_cluster.queue_split import STARTUP_SHARE, FileQueue, batch_sizes, died


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


# -- batch size and per-process start-up (made-up timings) -------------------------------


def test_a_negligible_start_up_leaves_the_batches_as_they_were():
    assert batch_sizes([1.0] * 120, 3, startup=0.05) == batch_sizes([1.0] * 120, 3)


def test_a_costly_start_up_makes_batches_large_enough_to_keep_it_under_its_share():
    startup = 2.0
    sizes = batch_sizes([1.0] * 120, 3, startup=startup)
    plain = batch_sizes([1.0] * 120, 3)
    assert sizes[0] == plain[0] == 10  # nothing observed yet
    assert len(sizes) < len(plain) and sum(sizes) == 120
    # Every batch but the tail (capped at a worker's share of what is left) keeps the
    # start-up at most STARTUP_SHARE of its time: 2 s over >= 11.3 s of tests.
    enough = startup * (1 - STARTUP_SHARE) / STARTUP_SHARE
    remaining = 120 - sizes[0]
    capped = 0
    for size in sizes[1:]:
        if remaining / 3 >= enough:
            assert startup / (startup + size) <= STARTUP_SHARE, sizes
        else:
            capped += 1
        remaining -= size
    assert capped < len(sizes) // 2, sizes
    # The end still shrinks toward the floor, so the workers finish together.
    assert sizes[-3:] == sorted(sizes[-3:], reverse=True), sizes


def test_start_up_is_compared_in_seconds_whatever_the_costs_are_counted_in():
    # By size (bytes) without history: 100 "bytes" a file, measured at 0.01 s a byte.
    by_size = batch_sizes([100.0] * 120, 3, startup=2.0, seconds_per_cost=0.01)
    assert by_size == batch_sizes([1.0] * 120, 3, startup=2.0)


def test_start_up_is_the_median_of_the_batches_wall_minus_tested_time():
    queue = FileQueue({"a": 1.0, "b": 1.0, "c": 1.0}, workers=1)
    assert queue.startup() is None
    queue.observe(["a"], wall=3.0, tested=1.0)
    queue.observe(["b"], wall=1.5, tested=1.0)
    queue.observe(["c"], wall=40.0, tested=1.0)  # one stalled batch does not decide it
    assert queue.startup() == 2.0
    queue.observe(["a"], wall=1.0, tested=0.0)  # no times in the report: ignored
    queue.observe(["b"], wall=0.5, tested=1.0)  # the report over-counts: no start-up
    assert queue.startup() == 1.25  # the median of 0, 0.5, 2 and 39


def test_a_worker_s_share_of_what_is_left_caps_the_start_up_rule():
    queue = FileQueue({f"f{i}": 1.0 for i in range(12)}, workers=3)
    queue.observe(["f0"], wall=60.0, tested=1.0)  # start-up 59 s: 334 files would do
    batch = queue.take()
    assert batch is not None and len(batch.files) == 4  # 12 / 3: the others still get work


@settings(max_examples=200)
@given(st.dictionaries(st.text("abc/._", min_size=1, max_size=8), st.floats(0, 100),
                       max_size=60),
       st.integers(1, 5), st.data())
def test_every_file_is_done_exactly_once_whatever_the_start_up_and_finishing_order(
        costs, workers, data):
    queue = FileQueue(costs, workers, max_returns=1000)
    out: list = []
    done: list[str] = []
    while True:
        # Keep up to ``workers`` batches out, as the worker threads do.
        while len(out) < workers and (batch := queue.take(block=False)) is not None:
            out.append(batch)
        if not out:
            assert queue.take() is None
            break
        batch = out.pop(data.draw(st.integers(0, len(out) - 1), label="finishes"))
        if data.draw(st.booleans(), label="dies"):
            assert queue.give_back(batch)
            continue
        wall = data.draw(st.floats(0, 1000), label="wall")
        tested = data.draw(st.floats(0, 1000), label="tested")
        queue.observe(batch.files, wall, tested)
        done.extend(batch.files)
        queue.done(batch)
    assert sorted(done) == sorted(costs)

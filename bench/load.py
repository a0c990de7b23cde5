"""Load generators shared by the oxide and Celery clients (standard library only).

The Celery client runs in its own virtualenv and imports this module too, so it must not
import anything outside the standard library.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def parse_rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def closed_loop(count: int, clients: int, make_worker: Callable[[], Callable[[], Any]]
                ) -> float:
    """``clients`` threads run ``count`` calls back to back; returns calls per second.

    ``make_worker`` is called once per thread (its own connection) and returns the call.
    """
    remaining = [count]
    lock = threading.Lock()
    errors: list[BaseException] = []
    ready = threading.Barrier(clients + 1)

    def run() -> None:
        call = make_worker()
        ready.wait()
        try:
            while True:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                call()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return count / elapsed


def open_loop(rate: float, duration: float, make_worker: Callable[[], Callable[[float], Any]],
              threads: int = 48) -> list[Any]:
    """Offer ``rate`` calls/s for ``duration`` s whatever the answers take (open loop).

    Each call gets its *scheduled* wall-clock time, so a slow system cannot hide its
    queueing delay by slowing the client down (no coordinated omission). Returns the
    calls' results in schedule order.
    """
    count = max(1, int(rate * duration))
    jobs: queue.Queue[tuple[int, float] | None] = queue.Queue()
    results: list[Any] = [None] * count
    errors: list[BaseException] = []
    ready = threading.Barrier(threads + 1)

    def run() -> None:
        call = make_worker()
        ready.wait()
        while (job := jobs.get()) is not None:
            index, scheduled = job
            try:
                results[index] = call(scheduled)
            except BaseException as error:
                errors.append(error)

    pool = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    ready.wait()
    t0 = time.time() + 0.05
    for index in range(count):
        scheduled = t0 + index / rate
        delay = scheduled - time.time()
        if delay > 0:
            time.sleep(delay)
        jobs.put((index, scheduled))
    for _ in pool:
        jobs.put(None)
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    return results

"""Client side of the Celery comparison, run with the Celery virtualenv's python.

    python -m bench.celery_client throughput COUNT CLIENTS
    python -m bench.celery_client latency RATE DURATION

Prints one JSON object. ``app.backend`` is thread-local in Celery, so every client thread
has its own result consumer (its own Redis pub/sub connection).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from bench.celery_app import app, run_true
from bench.load import open_loop


def throughput(count: float, clients: float) -> dict[str, Any]:
    """Each of ``clients`` threads submits its share at once, then waits for every result."""
    count, clients = int(count), int(clients)
    shares = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]
    ready = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def run(share: int) -> None:
        app.backend  # noqa: B018 (create this thread's backend before timing)
        ready.wait()
        try:
            results = [run_true.apply_async() for _ in range(share)]
            for result in results:
                result.get(timeout=120)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return {"tasks": count, "clients": clients, "seconds": elapsed, "per_s": count / elapsed}


def latency(rate: float, duration: float) -> dict[str, Any]:
    def make_worker() -> Any:
        app.backend  # noqa: B018

        def call(scheduled: float) -> tuple[float, float]:
            started, finished = run_true.apply_async().get(timeout=60)
            return started - scheduled, time.time() - finished
        return call

    samples = open_loop(rate, duration, make_worker)
    return {"start": [s for s, _ in samples], "finish": [f for _, f in samples]}


def main() -> None:
    mode, first, second = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    run_true.apply_async().get(timeout=60)  # warm up: connections, worker imports
    run = throughput if mode == "throughput" else latency
    print(json.dumps(run(first, second)))


if __name__ == "__main__":
    main()

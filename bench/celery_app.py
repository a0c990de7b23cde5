"""The Celery side of the comparison: one task that runs ``/bin/true`` like oxide does.

Imported only inside ``bench/.venv-celery`` (by the worker and by ``celery_client``);
the broker and result backend come from ``BENCH_CELERY_REDIS``.
"""

from __future__ import annotations

import os
import subprocess
import time

from celery import Celery

REDIS = os.environ.get("BENCH_CELERY_REDIS", "redis://127.0.0.1:6379/0")
app = Celery("bench", broker=REDIS, backend=REDIS)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                worker_prefetch_multiplier=4, task_acks_late=False,
                broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)


@app.task(name="bench.run_true")
def run_true() -> tuple[float, float]:
    """Run /bin/true; return wall-clock start and end, for the latency section."""
    started = time.time()
    subprocess.run(["/bin/true"], check=True)
    return started, time.time()

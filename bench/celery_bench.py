"""Celery + Redis as the baseline: its own virtualenv, a redis-server, a 2-process worker.

Celery is not a dependency of the project: it lives in ``bench/.venv-celery`` (created on
first use, ignored by git). The worker runs ``bench.celery_app.run_true``; the client
(``bench.celery_client``) runs in the same virtualenv and prints JSON.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO
from tests.redis_server import RedisServer

VENV = REPO / "bench" / ".venv-celery"
PYTHON = VENV / "bin" / "python"


def ensure_venv() -> float:
    """Create the virtualenv and install ``celery[redis]`` once; returns seconds spent."""
    started = time.monotonic()
    if PYTHON.exists() and subprocess.run(
            [str(PYTHON), "-c", "import celery, redis"], capture_output=True).returncode == 0:
        return 0.0
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", "celery[redis]"], check=True)
    return time.monotonic() - started


class CeleryRig:
    """redis-server plus ``celery worker --concurrency 2 --pool prefork`` for one run."""

    def __init__(self, home: Path, concurrency: int = 2) -> None:
        self.home = home
        self.concurrency = concurrency
        self.redis = RedisServer(home / "redis")
        self.worker: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PYTHONPATH=str(REPO), BENCH_CELERY_REDIS=self.redis.url)
        return env

    def __enter__(self) -> CeleryRig:
        self.redis.start()
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "worker.log", "ab")  # the worker keeps its own copy
        self.worker = subprocess.Popen(
            [str(PYTHON), "-m", "celery", "-A", "bench.celery_app", "worker",
             "--concurrency", str(self.concurrency), "--pool", "prefork", "--loglevel",
             "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=REPO, env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.client("throughput", 10, 1)  # waits until the worker consumes
        return self

    def __exit__(self, *exc: object) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGTERM)
            try:
                self.worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait(5)
        self.redis.stop()

    @property
    def pid(self) -> int:
        assert self.worker is not None
        return self.worker.pid

    def client(self, mode: str, first: float, second: float) -> dict[str, Any]:
        done = subprocess.run(
            [str(PYTHON), "-m", "bench.celery_client", mode, str(first), str(second)],
            cwd=REPO, env=self.environment(), capture_output=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError("celery client failed:\n" + done.stderr.decode()[-3000:]
                               + (self.home / "worker.log").read_text(errors="replace")[-2000:])
        return json.loads(done.stdout.splitlines()[-1])

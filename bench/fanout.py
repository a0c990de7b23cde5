"""One real test suite spread over the pool, against running it locally.

    python -m bench --sections fanout

The suite is more-itertools' (its sdist from PyPI through ``pip download``, cached under
``bench/results/cache/``, never committed), run by pytest (it is a unittest suite). Its
tests live in two files, one of them holding most of the test classes, so splitting by
file could not use three workers; the bench adds ``tests/oxide_split/``, one module per
test class that only imports it (``from tests.test_more import ChunkedTests``), and every
run below, the local ones included, runs exactly those modules: the same tests, counted
from each run's JUnit report, which must agree.

Measured in the same run, on this machine:

* local, one process: ``python -m pytest tests/oxide_split`` (the baseline);
* local, ``pytest -n 2`` (pytest-xdist, installed with ``pip install --target`` into the
  cache, not into the environment; said so when it cannot be installed);
* the pool: 3 local nodes on 127.0.0.1 (one slot each, static peers, Redis), the CLI
  with ``--parallel 3 --split`` twice (the first run splits by size and records the
  durations, the second splits by them), then ``--parallel 3 --split --queue-split``.

From the recorded durations: the lower bound of any 3-way split (the larger of a third of
the summed test time and the longest file), to compare the queue's slowest worker with.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS, SECRET
from oxide_cluster.workspace_client import junit_summary

CACHE = RESULTS / "cache"
PROJECT = "more-itertools"
SUITE = "more-itertools-bench"
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1"]
SPLIT_GLOB = "tests/oxide_split/test_*.py"


def fetch_suite(home: Path) -> Path:
    """The unpacked sdist under ``home`` (downloaded once into the cache)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    archives = sorted(CACHE.glob("more_itertools-*.tar.gz"))
    if not archives:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                        "--no-deps", "-q", "-d", str(CACHE), PROJECT], check=True)
        archives = sorted(CACHE.glob("more_itertools-*.tar.gz"))
    with tarfile.open(archives[-1]) as archive:
        archive.extractall(home, filter="data")
    root = home / archives[-1].name.removesuffix(".tar.gz")
    split_by_class(root)
    return root


# Lists the unittest classes with tests of each test module (run in the suite's root).
_CLASSES = """import importlib, sys, unittest
loader = unittest.TestLoader()
for stem in sys.argv[1:]:
    module = importlib.import_module("tests." + stem)
    for name, value in sorted(vars(module).items()):
        if isinstance(value, type) and issubclass(value, unittest.TestCase) \\
                and value.__module__ == module.__name__ and loader.getTestCaseNames(value):
            print(stem, name)
"""


def split_by_class(root: Path) -> int:
    """One module per test class (one with tests: a module of helpers alone would make
    pytest exit 5, "no tests") under ``tests/oxide_split/``; returns how many."""
    target = root / "tests" / "oxide_split"
    target.mkdir()
    (target / "__init__.py").write_text("")
    stems = [module.stem for module in sorted((root / "tests").glob("test_*.py"))]
    listed = subprocess.run([sys.executable, "-c", _CLASSES, *stems], cwd=root, check=True,
                            capture_output=True, text=True,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}).stdout
    count = 0
    for line in listed.splitlines():
        stem, name = line.split()
        (target / f"test_{stem}_{name}.py").write_text(
            f"from tests.{stem} import {name}  # noqa: F401\n")
        count += 1
    return count


def xdist() -> Path | None:
    """A directory holding pytest-xdist (for PYTHONPATH), or None when not installable."""
    target = CACHE / "xdist"
    if not (target / "xdist").is_dir():
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                               "--target", str(target), "pytest-xdist", "execnet"],
                              capture_output=True)
        if done.returncode != 0:
            return None
    return target


def _tests(report: Path) -> int:
    summary = junit_summary(report.read_bytes()) if report.exists() else None
    return -1 if summary is None else summary.tests


def local(root: Path, extra: list[str], pythonpath: Path | None = None) -> dict[str, Any]:
    report = root / "reports" / f"local{len(extra)}.xml"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    started = time.monotonic()
    done = subprocess.run([sys.executable, *PYTEST, *extra, f"--junitxml={report}",
                           "tests/oxide_split"], cwd=root, env=env, capture_output=True)
    wall = time.monotonic() - started
    tests = _tests(report)
    report.unlink(missing_ok=True)
    return {"wall_s": wall, "tests": tests, "code": done.returncode}


def pool(url: str, root: Path, out: Path, queue: bool) -> dict[str, Any]:
    """One ``run --parallel 3`` of the suite through the node at ``url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OXIDE_")}
    env.update(OXIDE_NODE=url, OXIDE_CLUSTER_SECRET=SECRET, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "oxide_cluster.cli", "run", "--parallel", "3",
               "--workspace", str(root), "--exclude", "__pycache__", "--exclude", "reports",
               "--split", SPLIT_GLOB, "--suite", SUITE, "--junit", "reports/*.xml",
               "--artifacts-dir", str(out), *(["--queue-split"] if queue else []), "--",
               sys.executable, *PYTEST, "--junitxml=reports/junit.xml", "{files}"]
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    stderr = done.stderr
    slowest = re.search(r"slowest shard (\S+) (\d+\.\d+)s", stderr)
    runs = [float(s) for s in re.findall(r"^oxide-cluster: shard \S+ task \S+: exit \d+ in "
                                         r"(\d+\.\d+)s", stderr, re.MULTILINE)]
    per_worker: dict[str, float] = {}
    for label, seconds in re.findall(r"^oxide-cluster: shard (\d+)/3#\d+ task \S+: exit \d+ "
                                     r"in (\d+\.\d+)s", stderr, re.MULTILINE):
        per_worker[label] = per_worker.get(label, 0.0) + float(seconds)
    split = re.search(r"split \d+ files by (\w+)", stderr)
    return {"wall_s": wall, "tests": _tests(out / "junit.xml"), "code": done.returncode,
            "slowest_shard_s": float(slowest.group(2)) if slowest else None,
            "task_seconds": runs, "worker_busy_s": per_worker,
            "batches": len(runs) if queue else None,
            "split_by": split.group(1) if split else None,
            "stderr_tail": stderr.splitlines()[-6:]}


def lower_bound(durations: dict[str, float], workers: int) -> float:
    """No split of these files over ``workers`` can finish sooner (test time only)."""
    if not durations:
        return 0.0
    return max(sum(durations.values()) / workers, max(durations.values()))

"""Recorded per-file durations of a test suite, kept by the cluster for ``--split``.

``oxide-cluster run --parallel N --split GLOB`` balances the files by the durations of
earlier runs of the same suite (``--suite NAME``) and, after a run, stores what it
measured. The cluster keeps them where its other shared state lives: standalone in the
node's SQLite store, with Redis in Redis (``oxide:{cluster}:suite:{name}:durations``), so
that they outlive a leader and every node of the cluster answers the same.

This module parses what a client sends (one place that refuses anything unexpected) and
holds the two storages behind one protocol; the routes in ``api.py`` only call it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Protocol

from twisted.internet import defer

from oxide_cluster.cluster_queue import _unavailable
from oxide_cluster.redis_connection import RedisCommands

SUITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_FILES = 20_000
MAX_PATH = 1024
MAX_SECONDS = 7 * 24 * 3600.0
# Kept a year past the last write: a suite nobody runs any more goes away by itself.
REDIS_TTL = 366 * 24 * 3600


class SuiteError(ValueError):
    """A suite name or durations body that is refused (400)."""


def parse_suite_name(name: str) -> str:
    """``name`` if it is a suite name (letters, digits, ``._-``, at most 128)."""
    if not SUITE_NAME.fullmatch(name):
        raise SuiteError("suite name must be 1 to 128 of A-Z a-z 0-9 . _ - "
                           "(not starting with . _ -)")
    return name


def parse_durations(body: Any) -> dict[str, float]:
    """The ``durations`` of a ``PUT /suites/{name}/durations`` body: relative file paths
    (as ``--split`` globs see them) to seconds."""
    if not isinstance(body, dict) or set(body) != {"durations"}:
        raise SuiteError("body must be an object with exactly one field, 'durations'")
    durations = body["durations"]
    if not isinstance(durations, dict):
        raise SuiteError("'durations' must be an object of file path to seconds")
    if len(durations) > MAX_FILES:
        raise SuiteError(f"'durations' has {len(durations)} files, over {MAX_FILES}")
    parsed: dict[str, float] = {}
    for path, seconds in durations.items():
        if not path or len(path) > MAX_PATH or path.startswith("/") or "\0" in path \
                or ".." in path.split("/"):
            raise SuiteError(f"'durations' key {path[:80]!r} is not a relative file path "
                               f"of at most {MAX_PATH} characters")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or not math.isfinite(seconds) or not 0 <= seconds <= MAX_SECONDS:
            raise SuiteError(f"'durations' of {path[:80]!r} must be a number of seconds "
                               f"from 0 to {MAX_SECONDS:g}")
        parsed[path] = float(seconds)
    return parsed


class SuiteDurations(Protocol):
    """Where a cluster keeps its suites' durations."""

    def get(self, suite: str) -> defer.Deferred[dict[str, float] | None]:
        """The recorded durations, or None for a suite never recorded."""

    def put(self, suite: str, durations: dict[str, float]) -> defer.Deferred[None]:
        """Replace the suite's durations."""


class SqliteStore(Protocol):
    def get_suite_durations(self, suite: str) -> defer.Deferred[dict[str, float] | None]: ...

    def put_suite_durations(self, suite: str, durations: dict[str, float]
                            ) -> defer.Deferred[None]: ...


class StoreSuiteDurations:
    """Standalone: the node's own SQLite store."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    def get(self, suite: str) -> defer.Deferred[dict[str, float] | None]:
        return self._store.get_suite_durations(suite)

    def put(self, suite: str, durations: dict[str, float]) -> defer.Deferred[None]:
        return self._store.put_suite_durations(suite, durations)


def _decode(reply: Any) -> dict[str, float] | None:
    if reply is None:
        return None
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    loaded: Mapping[str, float] = json.loads(text)
    return {str(path): float(seconds) for path, seconds in loaded.items()}


class RedisSuiteDurations:
    """With Redis: one JSON string per suite, shared by every node and any leader."""

    def __init__(self, redis: RedisCommands, cluster: str) -> None:
        self._redis = redis
        self._prefix = f"oxide:{cluster}:suite:"

    def key(self, suite: str) -> str:
        return f"{self._prefix}{suite}:durations"

    def get(self, suite: str) -> defer.Deferred[dict[str, float] | None]:
        reply = self._redis.command("GET", self.key(suite))
        return reply.addCallbacks(_decode, _unavailable)

    def put(self, suite: str, durations: dict[str, float]) -> defer.Deferred[None]:
        text = json.dumps(durations, separators=(",", ":"), sort_keys=True)
        reply = self._redis.command("SET", self.key(suite), text, "EX", REDIS_TTL)
        return reply.addCallbacks(lambda _: None, _unavailable)

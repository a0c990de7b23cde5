"""Deferreds waiting for something about a key (a task's end, output past an offset).

One helper instead of hand-made lists: a waiter cancelled before it fires (a long-poll's
``addTimeout``) is unregistered at once, not kept until the task ends, so a client that
polls a long task every few seconds leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Waiters(Generic[K, T]):
    """Waiters by key, each with an optional mark (an offset) that ``fire`` may test."""

    def __init__(self) -> None:
        self._by_key: dict[K, list[tuple[object, defer.Deferred[T]]]] = {}

    def wait(self, key: K, mark: object = None) -> defer.Deferred[T]:
        """A Deferred that ``fire(key, …)`` fires; cancelling it unregisters it."""
        def forget(waiter: defer.Deferred[T]) -> None:
            waiting = self._by_key.get(key)
            if waiting is None:
                return
            waiting[:] = [entry for entry in waiting if entry[1] is not waiter]
            if not waiting:
                del self._by_key[key]
        waiter: defer.Deferred[T] = defer.Deferred(forget)
        self._by_key.setdefault(key, []).append((mark, waiter))
        return waiter

    def fire(self, key: K, result: T | Failure,
             ready: Callable[[object], bool] | None = None) -> None:
        """Fire the waiters of ``key`` whose mark is ``ready`` (all without a test); a
        :class:`Failure` errbacks them."""
        waiting = self._by_key.pop(key, None)
        if not waiting:
            return
        keep = []
        for mark, waiter in waiting:
            if ready is None or ready(mark):
                if waiter.called:
                    continue
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            else:
                keep.append((mark, waiter))
        if keep:
            self._by_key.setdefault(key, []).extend(keep)

    def keys(self) -> list[K]:
        """The keys someone waits on."""
        return list(self._by_key)

    def count(self, key: K | None = None) -> int:
        """Waiters registered (for ``key``, or in all)."""
        if key is not None:
            return len(self._by_key.get(key, ()))
        return sum(len(waiting) for waiting in self._by_key.values())

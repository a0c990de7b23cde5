"""A split-brain checker for any set of nodes: one sampling thread per node.

A sample that says "I lead with token T" proves leadership somewhere inside its request's
[sent, received] window; two samples of the same term prove it for the whole span between
them, so the checker asserts that no two terms of different nodes are proven to overlap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


class SplitBrainChecker:
    """``leader_view(node)`` returns the node's ``/api/cluster/leader`` answer; it may raise
    any of ``unreachable`` for a killed, stopped or frozen node."""

    def __init__(self, nodes: Sequence[Any], node_id_of: Callable[[Any], str],
                 leader_view: Callable[[Any], dict[str, Any]],
                 unreachable: tuple[type[BaseException], ...] = (Exception,)) -> None:
        self._own = [node_id_of(node) for node in nodes]  # read while every node answers
        self._view = leader_view
        self._unreachable = unreachable
        # (node_id, token) -> [first received, last sent] of its "I lead" samples
        self.terms: dict[tuple[str, int], list[float]] = {}
        self.samples = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample, args=(node, own), daemon=True)
                         for node, own in zip(nodes, self._own, strict=True)]

    def __enter__(self) -> SplitBrainChecker:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.assert_no_overlap()

    def _sample(self, node: Any, own: str) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                view = self._view(node)
            except self._unreachable:
                self._stop.wait(0.02)
                continue
            received = time.monotonic()
            with self._lock:
                self.samples += 1
                if view["node_id"] == own:
                    term = self.terms.setdefault((own, view["token"]), [received, sent])
                    term[0] = min(term[0], received)
                    term[1] = max(term[1], sent)
            self._stop.wait(0.01)

    def assert_no_overlap(self) -> None:
        with self._lock:
            terms = sorted(self.terms.items(), key=lambda item: item[0][1])
        print(f"\nsplit-brain checker: {self.samples} samples, terms "
              f"{[(node[:8], token) for (node, token), _ in terms]}")
        assert self.samples > 0
        for i, ((node_a, token_a), (start_a, end_a)) in enumerate(terms):
            for (node_b, token_b), (start_b, end_b) in terms[i + 1:]:
                if node_a != node_b:
                    overlap = min(end_a, end_b) - max(start_a, start_b)
                    assert overlap <= 0, (f"{node_a}:{token_a} and {node_b}:{token_b} both "
                                          f"led for {overlap:.3f} s")

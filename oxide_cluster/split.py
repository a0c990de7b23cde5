"""How ``run --split`` divides files: by recorded durations when the suite has them, by
size when not, and how a run's JUnit reports become the durations of the next one.

Pure functions, no I/O: :mod:`oxide_cluster.fanout` fetches and stores the durations
(``GET``/``PUT /suites/{name}/durations``) and calls these.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence

from oxide_cluster.workspace_client import junit_summary

SUITE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def default_suite_name(workspace_name: str) -> str | None:
    """The workspace directory's name as a suite name (odd characters become ``-``),
    None when nothing usable is left."""
    name = SUITE_CHARS.sub("-", workspace_name).lstrip("._-")[:128]
    return name or None


def weights(sizes: Mapping[str, int], durations: Mapping[str, float]
            ) -> tuple[dict[str, float], str]:
    """Each file's expected cost and what it is based on (``durations`` or ``size``).

    With history, a file it lacks (new since the last run) is estimated from its size at
    the suite's recorded seconds per byte, so one new file does not throw the split back
    to sizes."""
    known = {name: durations[name] for name in sizes if name in durations}
    if not known:
        return {name: float(size) for name, size in sizes.items()}, "size"
    known_bytes = sum(sizes[name] for name in known)
    per_byte = sum(known.values()) / known_bytes if known_bytes else 0.0
    fallback = sum(known.values()) / len(known)
    result = {name: known[name] if name in known
              else (sizes[name] * per_byte if per_byte else fallback) for name in sizes}
    return result, "durations"


def split_by_weight(costs: Mapping[str, float], shards: int) -> list[list[str]]:
    """Greedy longest-processing-time: the costliest file first (ties by name) onto the
    lightest part so far (ties: the lowest index). Deterministic; no part is empty;
    each part sorted by name."""
    if shards < 1:
        raise ValueError("the number of shards must be at least 1")
    parts: list[list[str]] = [[] for _ in range(min(shards, len(costs)))]
    loads = [0.0] * len(parts)
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        lightest = min(range(len(parts)), key=lambda i: (loads[i], i))
        parts[lightest].append(name)
        loads[lightest] += costs[name]
    return [sorted(part) for part in parts]


def pack_under_longest(costs: Mapping[str, float], parts: Sequence[Sequence[str]]
                       ) -> list[list[str]]:
    """``parts`` (a :func:`split_by_weight` result) again, when one file alone sets how
    long the run takes: the other files packed first-fit (costliest first) into as few
    shards as hold them within that file's cost, each remaining shard given one of the
    cheapest files (no part empty). Otherwise ``parts`` unchanged.

    Spreading them evenly would not end the run sooner, but on nodes that share a host's
    cores every extra busy shard (and its start-up) takes CPU from the longest one; the
    bench's 3 nodes on 2 cores lost 1.5 s of 15 s that way."""
    if len(parts) < 3:
        return [list(part) for part in parts]
    order = sorted(costs, key=lambda n: (-costs[n], n))
    longest = order[0]
    bound = costs[longest]
    if max(sum(costs[n] for n in part) for part in parts) > bound:
        return [list(part) for part in parts]
    spare = order[len(order) - (len(parts) - 2):]  # one each for shards 3..n
    packed: list[list[str]] = [[longest], []] + [[name] for name in reversed(spare)]
    loads = [sum(costs[n] for n in part) for part in packed]
    for name in order[1:len(order) - len(spare)]:
        fits = [i for i in range(1, len(packed)) if loads[i] + costs[name] <= bound]
        if not fits:
            return [list(part) for part in parts]
        packed[fits[0]].append(name)
        loads[fits[0]] += costs[name]
    return [sorted(part) for part in packed]


# -- JUnit → per-file seconds -----------------------------------------------------------


def _match(candidate: str, files: Sequence[str]) -> str | None:
    """The file that ``candidate`` (a path, maybe relative to another directory) names."""
    candidate = candidate.removeprefix("./")
    for name in files:
        if name == candidate or name.endswith("/" + candidate) \
                or candidate.endswith("/" + name):
            return name
    return None


def _file_of(case: ElementTree.Element, files: Sequence[str],
             memo: dict[str, str | None]) -> str | None:
    """The file a ``<testcase>`` came from: its ``file`` attribute (pytest's xunit1),
    else the longest dotted prefix of its ``classname`` that is a module among ``files``
    (``tests.test_more.ChunkedTests`` → ``tests/test_more.py``)."""
    path = case.get("file")
    if path:
        if path not in memo:
            memo[path] = _match(path, files)
        if memo[path] is not None:
            return memo[path]
    classname = case.get("classname") or ""
    if classname not in memo:
        parts = classname.split(".")
        found = None
        for end in range(len(parts), 0, -1):
            found = _match("/".join(parts[:end]) + ".py", files)
            if found is not None:
                break
        memo[classname] = found
    return memo[classname]


def _seconds(text: str | None) -> float:
    try:
        value = float(text or 0)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0


def report_durations(reports: Sequence[bytes], files: Sequence[str]) -> dict[str, float]:
    """Seconds per file of ``files`` summed over the test cases of ``reports`` (one
    shard's JUnit files) that can be traced to one of them."""
    memo: dict[str, str | None] = {}
    found: dict[str, float] = {}
    for data in reports:
        if junit_summary(data) is None:  # not JUnit, or refused (DOCTYPE/entities)
            continue
        for case in ElementTree.fromstring(data).iter("testcase"):
            name = _file_of(case, files, memo)
            if name is not None:
                found[name] = found.get(name, 0.0) + _seconds(case.get("time"))
    return found


def shard_durations(reports: Sequence[bytes], files: Sequence[str],
                    sizes: Mapping[str, int], wall: float | None) -> dict[str, float]:
    """Every file of one shard with its seconds: from its JUnit test cases where they can
    be traced to it; the rest of the shard's run time (``wall``) spread over the other
    files by size. Without ``wall``, only what the reports say."""
    found = report_durations(reports, files)
    rest = [name for name in files if name not in found]
    if rest and wall is not None:
        left = max(wall - sum(found.values()), 0.0)
        total = sum(sizes.get(name, 0) for name in rest)
        for name in rest:
            share = sizes.get(name, 0) / total if total else 1 / len(rest)
            found[name] = left * share
    return found


def updated(old: Mapping[str, float], measured: Mapping[str, float],
            current: Sequence[str]) -> dict[str, float]:
    """The durations to store: the old ones of files still matched, overwritten by what
    this run measured (files gone from the glob are forgotten)."""
    keep = set(current)
    result = {name: seconds for name, seconds in old.items() if name in keep}
    result.update({name: round(seconds, 4) for name, seconds in measured.items()})
    return result

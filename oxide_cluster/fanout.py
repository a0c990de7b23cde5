"""``oxide-cluster run --parallel N``: one command as N shards over the pool, one exit code,
one JUnit report.

The CLI is synchronous, so each shard is followed by a thread of its own running the same
:func:`oxide_cluster.cli.follow` as a single ``run`` (``Node`` keeps no connection, so the
threads share it); the main thread only waits for their results, which keeps Ctrl-C (a
signal, delivered to the main thread) able to cancel every shard. Output passes through a
:class:`ShardOutput` per shard and stream: whole lines, prefixed ``[i/N] ``, under one lock.

Files given by ``--split`` are balanced (greedy longest-processing-time) by the per-file
durations the cluster recorded for the suite (``--suite NAME``, default the workspace
directory's name; ``GET /suites/{name}/durations``; packed under a file that alone outlasts
an even share), by size when it has none. After the
run, each shard's JUnit test cases are traced to its files (the ``file`` attribute, or the
``classname``'s module), the rest of the shard's run time is spread over its other files by
size, and the result is stored (``PUT``) for the next split (:mod:`oxide_cluster.split`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import secrets
import shlex
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import attrs

from oxide_cluster import split as splitting
from oxide_cluster.cli import (
    EXIT_CANCELLED,
    EXIT_SOFTWARE,
    EXIT_USAGE,
    Failed,
    Interrupted,
    UploadProgress,
    _node_failure,
    _pause,
    _say,
    follow,
    request_body,
    submit,
    task_exit_code,
    wait_in_queue,
)
from oxide_cluster.client import Node, NodeError
from oxide_cluster.manifest import ManifestError, glob_regex
from oxide_cluster.workspace_client import (
    JUnitSummary,
    LocalTree,
    WorkspaceError,
    download_artifacts,
    junit_summary,
    scan_tree,
    upload_tree,
)

FILES = "{files}"
MAX_PARALLEL = 256
MAX_LINE = 64 * 1024  # a longer line without a newline is cut, or one shard holds the lock
CANCEL_WAIT = 15.0  # after Ctrl-C, how long the shards' ends are awaited
GROUPED_IN_MEMORY = 8 * 1024 * 1024  # --group-output spills to a temporary file beyond
# A lost shard's retry: how long the cluster is given to place it (the leader records the
# task lost, then places its retry, waiting up to peer_timeout per node), and how often it
# is asked. The search covers the newest tasks, where a retry placed just now is.
RETRY_WAIT = 30.0
RETRY_POLL = 0.5
RETRY_SEARCH = "/tasks?scope=cluster&limit=100"


def new_run_id() -> str:
    """The ``fanout.run`` of one ``run --parallel``: the dashboard folds its tasks."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


def shard_env(index: int, total: int) -> dict[str, str]:
    """The environment that tells shard ``index`` (0-based) of ``total`` which part is
    its own, under the names of our own, GitLab's (1-based) and Buildkite's (0-based)."""
    return {
        "OXIDE_SHARD_INDEX": str(index),
        "OXIDE_SHARD_TOTAL": str(total),
        "CI_NODE_INDEX": str(index + 1),
        "CI_NODE_TOTAL": str(total),
        "BUILDKITE_PARALLEL_JOB": str(index),
        "BUILDKITE_PARALLEL_JOB_COUNT": str(total),
    }


def expand_globs(paths: Iterable[str], globs: Sequence[str]) -> list[str]:
    """The relative ``paths`` matching any glob (``**`` for any depth, as artifact globs),
    sorted. Raises ValueError for a glob that is absolute or leaves the tree."""
    try:
        patterns = [glob_regex(pattern) for pattern in globs]
    except ManifestError as error:
        raise ValueError(str(error).replace("artifact glob", "--split glob")) from None
    return sorted({path for path in paths if any(p.match(path) for p in patterns)})


def split_by_size(sizes: Mapping[str, int], shards: int) -> list[list[str]]:
    """Split files into at most ``shards`` parts of nearly equal total size: largest file
    first (ties by name) onto the lightest part so far (ties: the one with fewer files,
    then the lowest index, so empty files still fill empty parts). The same
    input gives the same split; no part is empty (fewer files than shards: fewer parts);
    each part is sorted by name."""
    if shards < 1:
        raise ValueError("the number of shards must be at least 1")
    parts: list[list[str]] = [[] for _ in range(min(shards, len(sizes)))]
    loads = [0] * len(parts)
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        lightest = min(range(len(parts)), key=lambda i: (loads[i], len(parts[i]), i))
        parts[lightest].append(name)
        loads[lightest] += sizes[name]
    return [sorted(part) for part in parts]


def substitute(command: Sequence[str], files: Sequence[str]) -> list[str]:
    """``command`` with each shard's files in place of ``{files}``: an argument that is
    exactly ``{files}`` becomes one argument per file; inside a longer argument (``sh -c
    'pytest {files}'``) it becomes the shell-quoted list."""
    result: list[str] = []
    for argument in command:
        if argument == FILES:
            result.extend(files)
        else:
            result.append(argument.replace(FILES, shlex.join(files)))
    return result


class ShardOutput:
    """One shard's stdout or stderr: whole lines, each prefixed, written under a lock
    shared by every shard so that lines of two shards never mix."""

    def __init__(self, target: IO[bytes], prefix: bytes, lock: threading.Lock) -> None:
        self._target = target
        self._prefix = prefix
        self._lock = lock
        self._pending = bytearray()

    def write(self, data: bytes, /) -> int:
        self._pending += data
        end = self._pending.rfind(b"\n") + 1
        if not end and len(self._pending) > MAX_LINE:
            end = len(self._pending)
        if end:
            chunk = bytes(self._pending[:end])
            del self._pending[:end]
            self._emit(chunk)
        return len(data)

    def flush(self) -> None:
        """Nothing: a partial line waits for its end (or :meth:`close`)."""

    def close(self) -> None:
        """Write what is left of the last line, ended by a newline."""
        if self._pending:
            chunk = bytes(self._pending)
            self._pending.clear()
            self._emit(chunk)

    def _emit(self, chunk: bytes) -> None:
        lines = chunk.splitlines(keepends=True)
        text = b"".join(self._prefix + line if line.endswith(b"\n")
                        else self._prefix + line + b"\n" for line in lines)
        with self._lock:
            self._target.write(text)
            self._target.flush()


@attrs.define
class Shard:
    """One shard's task and what became of it."""

    index: int
    total: int
    files: list[str]
    task_id: str | None = None
    node_id: str | None = None
    code: int | None = None
    state: str | None = None
    reason: str | None = None
    seconds: float | None = None  # run time on its node (started_at to finished_at)
    artifacts: list[Path] = attrs.Factory(list)
    signal: int | None = None
    # --queue-split: this is batch ``index`` taken by worker ``worker`` of ``total``.
    worker: int | None = None
    # Earlier attempts that were lost (their node died) before ``task_id``, a retry.
    lost: list[str] = attrs.Factory(list)

    @property
    def label(self) -> str:
        if self.worker is not None:
            return f"{self.worker + 1}/{self.total}#{self.index + 1}"
        return f"{self.index + 1}/{self.total}"

    @property
    def directory(self) -> str:
        """Where its artifacts go under the run's artifacts directory."""
        if self.worker is not None:
            return f"batch-{self.index + 1}"
        return f"shard-{self.index + 1}"


def first_failure(shards: Sequence[Shard]) -> Shard | None:
    """The failing shard that decides the exit code: the lowest-numbered one, so the code
    does not depend on which shard happened to end first."""
    return next((shard for shard in shards if shard.code != 0), None)


# -- JUnit merge --------------------------------------------------------------------------


@attrs.frozen
class MergedJUnit:
    """The merged report, its total and each shard's counts (shard order)."""

    document: bytes
    total: JUnitSummary
    per_shard: list[JUnitSummary]


def _suites(data: bytes) -> list[ElementTree.Element]:
    if junit_summary(data) is None:  # not JUnit, or refused (DOCTYPE/entities)
        return []
    root = ElementTree.fromstring(data)
    return [root] if root.tag == "testsuite" else root.findall("testsuite")


def _add(a: JUnitSummary, b: JUnitSummary) -> JUnitSummary:
    return JUnitSummary(a.tests + b.tests, a.failures + b.failures, a.errors + b.errors,
                        a.skipped + b.skipped, a.time + b.time)


ZERO = JUnitSummary(0, 0, 0, 0, 0.0)


def merge_junit(reports: Sequence[Sequence[bytes]], name: str = "oxide-cluster",
                labels: Sequence[str] | None = None) -> MergedJUnit:
    """One ``<testsuites>`` holding every shard's suites (``reports[i]``: shard i's report
    files). Each suite gets its counts as attributes and an ``oxide.shard`` property
    (``2/4``); the root has the totals. Files that are not JUnit are left out."""
    root = ElementTree.Element("testsuites", name=name)
    per_shard = []
    total = ZERO
    for index, documents in enumerate(reports):
        shard_total = ZERO
        for data in documents:
            for suite in _suites(data):
                counts = junit_summary(ElementTree.tostring(suite))
                assert counts is not None  # a <testsuite> always has counts
                for key in ("tests", "failures", "errors", "skipped"):
                    suite.set(key, str(getattr(counts, key)))
                suite.set("time", f"{counts.time:.3f}")
                properties = suite.find("properties")
                if properties is None:
                    properties = ElementTree.Element("properties")
                    suite.insert(0, properties)
                ElementTree.SubElement(properties, "property", name="oxide.shard",
                                       value=labels[index] if labels is not None
                                       else f"{index + 1}/{len(reports)}")
                root.append(suite)
                shard_total = _add(shard_total, counts)
        per_shard.append(shard_total)
        total = _add(total, shard_total)
    for key in ("tests", "failures", "errors", "skipped"):
        root.set(key, str(getattr(total, key)))
    root.set("time", f"{total.time:.3f}")
    document = ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)
    return MergedJUnit(document, total, per_shard)


# -- the run ------------------------------------------------------------------------------


def _seconds(task: Mapping[str, Any]) -> float | None:
    try:
        started = datetime.fromisoformat(str(task["started_at"]))
        finished = datetime.fromisoformat(str(task["finished_at"]))
    except (KeyError, TypeError, ValueError):
        return None
    return (finished - started).total_seconds()


@attrs.define
class SplitPlan:
    """What ``--split`` matched, and the suite's durations before this run."""

    suite: str | None
    sizes: dict[str, int]
    durations: dict[str, float]


def _suite_path(suite: str) -> str:
    return f"/suites/{urllib.parse.quote(suite, safe='')}/durations"


def _recorded(node: Node, options: argparse.Namespace) -> tuple[str | None, dict[str, float]]:
    """The suite's name and its recorded durations (none when the node cannot say)."""
    suite = options.suite or splitting.default_suite_name(
        Path(options.workspace).resolve().name)
    if suite is None:
        _say("no suite name (give --suite NAME): durations are neither read nor recorded")
        return None, {}
    try:
        reply = node.request("GET", _suite_path(suite))
    except NodeError as error:
        if error.status == 400:
            raise Failed(EXIT_USAGE, f"run: --suite {suite}: {error}") from None
        _say(f"durations of suite {suite} not read ({error}): splitting by size")
        return suite, {}
    durations = reply.get("durations")
    return suite, dict(durations) if isinstance(durations, dict) else {}


def _plan(node: Node, options: argparse.Namespace, command: list[str]
          ) -> tuple[list[list[str]], dict[str, Any], SplitPlan | None]:
    """Each shard's files (empty lists without --split), the workspace fields, and what
    the split was made of."""
    if not 1 <= options.parallel <= MAX_PARALLEL:
        raise Failed(EXIT_USAGE, f"run: --parallel takes 1 to {MAX_PARALLEL}")
    if options.workspace is None:
        for flag, given in (("--split", options.split), ("--junit", options.junit),
                            ("--artifacts", options.artifacts)):
            if given:
                raise Failed(EXIT_USAGE, f"run: {flag} needs --workspace (files are "
                                         "taken from and collected in the workspace)")
        return [[] for _ in range(options.parallel)], {}, None
    if options.split and FILES not in " ".join(command):
        raise Failed(EXIT_USAGE, f"run: --split needs {FILES} in the command, where each "
                                 "shard's files go")
    if options.cwd is not None and options.cwd.startswith("/"):
        raise Failed(EXIT_USAGE, "run: with --workspace, --cwd is relative to the workspace")
    try:
        tree = scan_tree(options.workspace, options.exclude)
    except WorkspaceError as error:
        raise Failed(EXIT_USAGE, f"run: --workspace {options.workspace}: {error}") from None
    parts: list[list[str]] = [[] for _ in range(options.parallel)]
    plan = None
    if options.split:
        sizes = {entry.path: entry.size for entry in tree.manifest.files}
        try:
            chosen = expand_globs(sizes, options.split)
        except ValueError as error:
            raise Failed(EXIT_USAGE, f"run: {error}") from None
        if not chosen:
            raise Failed(EXIT_USAGE, "run: --split " + " ".join(options.split) +
                         f" matches no file of the workspace {options.workspace}")
        suite, durations = _recorded(node, options)
        plan = SplitPlan(suite, {name: sizes[name] for name in chosen}, durations)
        costs, basis = splitting.weights(plan.sizes, durations)
        if options.queue_split:
            _say(f"queue of {len(chosen)} files by {basis}" +
                 (f" of suite {suite}" if basis == "durations" else "") +
                 f" for {options.parallel} workers")
            return _upload(node, options, tree, [], plan)
        parts = splitting.split_by_weight(costs, options.parallel)
        if basis == "durations":  # sizes are too rough a guess to pack shards full
            parts = splitting.pack_under_longest(costs, parts)
        if len(parts) < options.parallel:
            _say(f"{len(chosen)} files for {options.parallel} shards: running "
                 f"{len(parts)} shards")
        loads = ", ".join(f"{len(part)}" + (f" ({sum(costs[n] for n in part):.1f}s)"
                                            if basis == "durations" else "")
                          for part in parts)
        _say(f"split {len(chosen)} files by {basis}" +
             (f" of suite {suite}" if basis == "durations" else "") + f": {loads}")
    return _upload(node, options, tree, parts, plan)


def _upload(node: Node, options: argparse.Namespace, tree: LocalTree,
            parts: list[list[str]], plan: SplitPlan | None
            ) -> tuple[list[list[str]], dict[str, Any], SplitPlan | None]:
    try:
        sent = upload_tree(node, tree, UploadProgress(_say))
    except WorkspaceError as error:
        raise Failed(EXIT_USAGE, f"run: --workspace {options.workspace}: {error}") from None
    except NodeError as error:
        raise _node_failure(error) from None
    _say(f"workspace {options.workspace}: {sent.files} files, {sent.total_bytes} bytes; "
         f"sent {sent.uploaded_blobs} blobs, {sent.uploaded_bytes} bytes")
    fields: dict[str, Any] = {"workspace": sent.digest}
    if options.artifacts or options.junit:
        fields["artifacts"] = [*options.artifacts, *options.junit]
    return parts, fields, plan


def _directory_name(group: str | None, task_id: str) -> str:
    """``group`` when it is a plain name (no ``/``, no leading dot), else the task id."""
    if group and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", group):
        return group
    return task_id


def _wait_started(node: Node, shard: Shard, task: dict[str, Any]) -> dict[str, Any]:
    return wait_in_queue(node, task, say=lambda line: _say(f"[{shard.label}] {line}"))


def _task_path(task_id: str) -> str:
    return f"/task/{urllib.parse.quote(task_id, safe='')}"


def find_retry(node: Node, lost: Mapping[str, Any], wait: float = RETRY_WAIT,
               clock: Callable[[], float] = time.monotonic,
               pause: Callable[[float], None] = _pause) -> str | None:
    """The id of the attempt the cluster placed for the ``lost`` task, None when none
    comes: no retries left, not retried (``secret_env``), or none seen within ``wait``.

    The leader records the task lost first and names its retry (``retried_by``) once
    placed, so the record is read again until it does; a restarted owner answers for
    its own lost task without that field, so the cluster's tasks are also searched for
    one whose ``retry_of`` is this task."""
    task_id = str(lost["id"])
    if int(lost.get("retries") or 0) < 1 or "not retried" in str(lost.get("reason")):
        return None
    deadline = clock() + wait
    while True:
        for path in (_task_path(task_id), RETRY_SEARCH):
            try:
                reply = node.request("GET", path)
            except NodeError:
                continue
            if reply.get("retried_by"):
                return str(reply["retried_by"])
            for task in reply.get("tasks") or []:
                if task.get("retry_of") == task_id:
                    return str(task["id"])
        if clock() > deadline:
            return None
        pause(RETRY_POLL)


def _follow_once(node: Node, shard: Shard, task: dict[str, Any], out: ShardOutput,
                 err: ShardOutput) -> dict[str, Any]:
    """One attempt of the shard to its end: the final task JSON (or state message)."""
    assert shard.task_id is not None
    task = _wait_started(node, shard, task)
    if task["state"] in ("queued", "running"):
        return follow(node, shard.task_id, stdout=out, stderr=err)
    follow(node, shard.task_id, until_live=True, stdout=out, stderr=err)
    return task


def follow_shard(node: Node, shard: Shard, task: dict[str, Any], out: ShardOutput,
                 err: ShardOutput) -> dict[str, Any]:
    """Follow the shard's task, and when it ends ``lost`` its retry (same prefix), until
    an attempt ends otherwise or no retry comes: the last attempt's final state."""
    while True:
        state = _follow_once(node, shard, task, out, err)
        if state.get("state") != "lost":
            return state
        assert shard.task_id is not None
        lost = state if "retries" in state else node.request("GET", _task_path(shard.task_id))
        retry = find_retry(node, lost)
        if retry is None:
            return {**state, **lost}
        _say(f"[{shard.label}] task {shard.task_id} lost ({lost.get('reason')}); "
             f"following its retry, task {retry}")
        shard.lost.append(shard.task_id)
        shard.task_id = retry
        task = node.request("GET", _task_path(retry))
        shard.node_id = task.get("node_id")


def _run_shard(node: Node, shard: Shard, task: dict[str, Any], out: ShardOutput,
               err: ShardOutput, artifacts_dir: Path | None) -> None:
    """Follow one shard to its end and fetch its artifacts (in a thread of its own)."""
    assert shard.task_id is not None
    try:
        state = follow_shard(node, shard, task, out, err)
        shard.code, shard.state = task_exit_code(state), state.get("state")
        shard.reason, shard.signal = state.get("reason"), state.get("signal")
    except Failed as failure:
        shard.code, shard.reason = failure.code, str(failure)
    except NodeError as error:
        mapped = _node_failure(error)
        shard.code, shard.reason = mapped.code, str(mapped)
    except Exception as error:  # a thread must always report back
        shard.code, shard.reason = EXIT_SOFTWARE, f"{type(error).__name__}: {error}"
    finally:
        out.close()
        err.close()
    try:
        shard.seconds = _seconds(node.request("GET", _task_path(shard.task_id)))
    except NodeError:
        pass  # only the timing line lacks it
    if artifacts_dir is not None:
        target = artifacts_dir / shard.directory
        try:
            shard.artifacts = download_artifacts(node, shard.task_id, target)
        except (WorkspaceError, NodeError, OSError) as error:
            _say(f"[{shard.label}] artifacts of task {shard.task_id} not downloaded: "
                 f"{error}")


def _shard_thread(node: Node, shard: Shard, task: dict[str, Any], out: ShardOutput,
                  err: ShardOutput, artifacts_dir: Path | None, ended: queue.Queue[Shard]
                  ) -> None:
    try:
        _run_shard(node, shard, task, out, err, artifacts_dir)
    except Exception as error:  # the main thread waits for all
        _say(f"[{shard.label}] {type(error).__name__}: {error}")
        if shard.code is None:
            shard.code = EXIT_SOFTWARE
    finally:
        ended.put(shard)


def _cancel(node: Node, shards: Sequence[Shard]) -> None:
    for shard in shards:
        if shard.task_id is not None and shard.code is None:
            try:
                node.request("POST", f"/task/{shard.task_id}/cancel", timeout=10)
            except NodeError as error:
                _say(f"[{shard.label}] cancel of task {shard.task_id} failed: {error}")


def run_parallel(node: Node, options: argparse.Namespace, command: list[str]) -> int:
    """``run --parallel N``: submit the shards, follow them all, report, and return the
    exit code of the lowest-numbered failing shard (0 when all succeeded)."""
    if options.queue_split:
        from oxide_cluster.queue_split import run_queue  # it imports this module
        return run_queue(node, options, command)
    with contextlib.ExitStack() as buffers:
        return _run_all(node, options, command, buffers)


def _run_all(node: Node, options: argparse.Namespace, command: list[str],
             buffers: contextlib.ExitStack) -> int:
    began = time.monotonic()
    parts, workspace_fields, plan = _plan(node, options, command)
    total = len(parts)
    shards = [Shard(index, total, files) for index, files in enumerate(parts)]
    run_id = new_run_id()
    lock = threading.Lock()
    grouped: list[tuple[IO[bytes], IO[bytes]]] = []
    ended: queue.Queue[Shard] = queue.Queue()
    artifacts_dir: Path | None = None
    try:
        for shard in shards:
            body = request_body(options, substitute(command, shard.files))
            body["env"] = {**body.get("env", {}), **shard_env(shard.index, total)}
            body.update(workspace_fields)
            body["fanout"] = {"run": run_id, "index": shard.index, "total": total,
                              "mode": "shards"}
            task = submit(node, body)
            shard.task_id, shard.node_id = task["id"], task["node_id"]
            _say(f"[{shard.label}] task {shard.task_id} on node {shard.node_id} "
                 f"({node.url}/ui/#task={shard.task_id})")
            if workspace_fields.get("artifacts") and artifacts_dir is None:
                artifacts_dir = Path(options.artifacts_dir or os.path.join(
                    "oxide-artifacts", _directory_name(options.group, shard.task_id)))
            if options.group_output:
                pair = (_spool(buffers), _spool(buffers))
                grouped.append(pair)
                out = ShardOutput(pair[0], b"", threading.Lock())
                err = ShardOutput(pair[1], b"", threading.Lock())
            else:
                prefix = f"[{shard.label}] ".encode()
                out = ShardOutput(sys.stdout.buffer, prefix, lock)
                err = ShardOutput(sys.stderr.buffer, prefix, lock)
            threading.Thread(target=_shard_thread, name=f"shard-{shard.label}", daemon=True,
                             args=(node, shard, task, out, err, artifacts_dir, ended)).start()
        for _ in range(sum(1 for shard in shards if shard.task_id is not None)):
            ended.get()
    except (Interrupted, NodeError, Failed) as why:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if isinstance(why, Interrupted):
            _say(f"{why}: cancelling {sum(1 for s in shards if s.task_id)} shards")
        _cancel(node, shards)
        deadline = time.monotonic() + CANCEL_WAIT
        for shard in shards:
            while shard.task_id is not None and shard.code is None \
                    and time.monotonic() < deadline:
                _pause(0.1)
        if isinstance(why, NodeError):
            raise _node_failure(why) from None
        if isinstance(why, Failed):
            raise
        return EXIT_CANCELLED
    wall = time.monotonic() - began
    if options.group_output:
        _print_grouped(shards, grouped)
    return _report(node, shards, options, artifacts_dir, wall, plan)


def _spool(buffers: contextlib.ExitStack) -> IO[bytes]:
    """A buffer for one stream of one shard under --group-output, closed with ``buffers``."""
    spooled = tempfile.SpooledTemporaryFile(GROUPED_IN_MEMORY)  # noqa: SIM115 - the stack owns it
    return buffers.enter_context(spooled)


def _print_grouped(shards: Sequence[Shard], grouped: Sequence[tuple[IO[bytes], IO[bytes]]]
                   ) -> None:
    for shard, (out, err) in zip(shards, grouped, strict=True):
        sys.stdout.buffer.write(f"==> shard {shard.label}, task {shard.task_id}: exit "
                                f"{shard.code} <==\n".encode())
        for buffer, target in ((out, sys.stdout.buffer), (err, sys.stderr.buffer)):
            buffer.seek(0)
            while block := buffer.read(1024 * 1024):
                target.write(block)
            target.flush()


def junit_reports(shard: Shard, artifacts_dir: Path, globs: Sequence[str]) -> list[bytes]:
    """The contents of the shard's downloaded artifacts that ``--junit`` globs match."""
    patterns = [glob_regex(pattern) for pattern in globs]
    root = artifacts_dir / shard.directory
    return [path.read_bytes() for path in sorted(shard.artifacts)
            if any(p.match(path.relative_to(root).as_posix()) for p in patterns)]


def _report(node: Node, shards: Sequence[Shard], options: argparse.Namespace,
            artifacts_dir: Path | None, wall: float, plan: SplitPlan | None) -> int:
    for shard in shards:
        took = "" if shard.seconds is None else f" in {shard.seconds:.2f}s"
        files = f" ({len(shard.files)} files)" if options.split else ""
        why = f": {shard.state or 'not followed'} ({shard.reason})" \
            if shard.code != 0 and shard.reason else ""
        retried = f" (retry of lost {', '.join(shard.lost)})" if shard.lost else ""
        _say(f"shard {shard.label} task {shard.task_id}{retried}: exit {shard.code}{took}"
             f"{files}{why}")
    timed = [shard for shard in shards if shard.seconds is not None]
    slowest = max(timed, key=lambda s: s.seconds or 0.0) if timed else None
    slow = f"; slowest shard {slowest.label} {slowest.seconds:.2f}s" if slowest else ""
    reports: list[list[bytes]] = [[] for _ in shards]
    if options.junit and artifacts_dir is not None:
        reports = [junit_reports(shard, artifacts_dir, options.junit) for shard in shards]
        merged = merge_junit(reports, labels=[shard.label for shard in shards])
        target = artifacts_dir / "junit.xml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(merged.document)
        for shard, counts in zip(shards, merged.per_shard, strict=True):
            _say(f"junit shard {shard.label}: {counts.line()}")
        _say(f"junit total {target}: {merged.total.line()}; wall {wall:.2f}s{slow}")
    else:
        _say(f"{len(shards)} shards in {wall:.2f}s wall{slow}")
    if plan is not None and plan.suite is not None:
        _record(node, plan, shards, reports)
    failed = first_failure(shards)
    if failed is None:
        return 0
    others = sum(1 for shard in shards if shard.code != 0) - 1
    how = "failed"
    if failed.state == "lost":
        how = f"was lost in all {len(failed.lost) + 1} attempts" if failed.lost \
            else "was lost"
    _say(f"shard {failed.label} (task {failed.task_id}) {how} with exit {failed.code}" +
         (f"; {others} more failed" if others else "") +
         " (the exit code is the lowest-numbered failing shard's)")
    assert failed.code is not None
    return failed.code


def _record(node: Node, plan: SplitPlan, shards: Sequence[Shard],
            reports: Sequence[Sequence[bytes]]) -> None:
    """Store what this run measured per file for the next split. A shard that did not
    run to its own end (cancelled, lost, timed out) tells nothing and is left out."""
    assert plan.suite is not None
    measured: dict[str, float] = {}
    for shard, documents in zip(shards, reports, strict=True):
        if shard.state not in ("succeeded", "failed"):
            continue
        measured.update(splitting.shard_durations(documents, shard.files, plan.sizes,
                                                  shard.seconds))
    if not measured:
        return
    durations = splitting.updated(plan.durations, measured, list(plan.sizes))
    try:
        node.request("PUT", _suite_path(plan.suite), {"durations": durations})
    except NodeError as error:
        _say(f"durations of suite {plan.suite} not recorded: {error}")
        return
    _say(f"recorded the durations of {len(measured)} files for suite {plan.suite}")

"""``oxide-cluster``: run a command on a node from CI and exit with its exit code.

``run`` streams the task's output over the WebSocket as it arrives (a dropped connection
is resumed from the last byte received) and exits with the task's exit code; Ctrl-C or
SIGTERM cancels the remote task. Exit codes are the :data:`EXIT_CODES` table, which
renders ``--help``'s epilog and the README's table (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Protocol

from oxide_cluster.client import (
    ConnectionClosed,
    HandshakeError,
    Node,
    NodeError,
    decode_output,
)
from oxide_cluster.workspace_client import (
    WorkspaceError,
    download_artifacts,
    junit_summaries,
    upload_workspace,
)

EXIT_TIMED_OUT = 124
EXIT_CANCELLED = 125
EXIT_NO_EXIT_CODE = 126
EXIT_USAGE = 2
EXIT_BAD_REQUEST = 65
EXIT_NO_TASK = 67  # sysexits EX_NOUSER, "addressee unknown": no task has that id
EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70
EXIT_CONNECTION = 74
EXIT_LOST = 75
EXIT_AUTH = 77
RECONNECT_FOR = 30.0
# How long to keep asking the cluster about a task whose stream broke: the leader marks a
# dead node's tasks lost after the node's ``dead_after`` (2.5 s) plus its recovery.
SETTLE_FOR = 60.0
RETRY_PAUSE = 0.5
QUEUE_POLL = 1.0  # how often a queued task's place is asked for while it waits
# 503 answers saying the task was admitted nowhere while the cluster changes (a new leader,
# Redis reconnecting, a node starting, back-pressure): submitting again is safe. Not
# retried: the answers saying it may be running (leader_unreachable, placement_unknown,
# node_unavailable) and draining (it lasts until an operator resumes the node).
RETRIED_REFUSALS = frozenset({"starting", "leader_changed", "queue_unavailable",
                              "cpu_busy", "memory_busy", "node_unreachable"})
SUBMIT_RETRY_FOR = 60.0
SECRET_HELP = ("give --secret or set OXIDE_CLUSTER_SECRET; a node started without one "
               "generated it into ~/.oxide/secret (its state_dir) on the node's host")

# The one exit-code table: --help's epilog and the README's table are rendered from it.
EXIT_CODES: tuple[tuple[str, str], ...] = (
    ("0-123", "the task's own exit code"),
    ("124", "the task timed out (as coreutils timeout)"),
    ("125", "the task was cancelled (also after Ctrl-C/SIGTERM here)"),
    ("126", "the task failed without an exit code (command not found, bad cwd)"),
    ("128+N", "the task was killed by signal N"),
    (str(EXIT_USAGE), "usage error: bad options, or a node URL without http://"),
    (str(EXIT_BAD_REQUEST), "the node rejected the request (400: bad field)"),
    (str(EXIT_NO_TASK), "no task has that id (unknown task id)"),
    (str(EXIT_UNAVAILABLE), "not run: waited queue_timeout (rejected), labels no node has "
                            "(422), or refused (429, 503 after 60 s of retries)"),
    (str(EXIT_SOFTWARE), "unexpected reply from the node"),
    (str(EXIT_CONNECTION), "the node cannot be reached or the stream was lost for good"),
    (str(EXIT_LOST), "the task was lost: the node running it died or restarted"),
    (str(EXIT_AUTH), "no secret given, or the node refused it"),
)


def exit_codes_text() -> str:
    """The exit-code table as plain text, for ``--help``."""
    rows = "\n".join(f"  {code:<7}{meaning}" for code, meaning in EXIT_CODES)
    return ("exit codes of run (and of logs --follow once the task ends):\n" + rows +
            "\n\nA task exit code from 124 up collides with these; use status to tell "
            "them apart.")


def exit_codes_rst() -> str:
    """The exit-code table as an RST simple table, as README.rst has it."""
    width = max(len(meaning) for _, meaning in EXIT_CODES)
    rule = "=" * 7 + "  " + "=" * width
    lines = [rule, f"{'code':<7}  meaning", rule]
    lines += [f"{code:<7}  {meaning}" for code, meaning in EXIT_CODES]
    return "\n".join([*lines, rule])


class Sink(Protocol):
    """Where :func:`follow` writes output: a binary stream, or a fan-out shard's."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: cancel the remote task."""


class Failed(Exception):
    """End the CLI with ``code`` after printing ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def usage_line(usage: Any) -> str | None:
    """``cpu 12.3 s, peak memory 410 MiB`` from a task's ``usage`` (None: nothing known)."""
    if not isinstance(usage, dict):
        return None
    parts = []
    if isinstance(usage.get("cpu_seconds"), int | float):
        parts.append(f"cpu {usage['cpu_seconds']:.1f} s")
    if isinstance(usage.get("memory_peak_bytes"), int):
        parts.append(f"peak memory {usage['memory_peak_bytes'] / 2**20:.0f} MiB")
    if not parts:
        return None
    return ", ".join(parts) + (" (sampled)" if usage.get("source") == "sampled" else "")


def task_exit_code(task: dict[str, Any]) -> int:
    """The documented exit code for a finished task's JSON."""
    state = task.get("state")
    if state == "timed_out":
        return EXIT_TIMED_OUT
    if state == "cancelled":
        return EXIT_CANCELLED
    if state == "lost":
        return EXIT_LOST
    if state == "rejected":
        return EXIT_UNAVAILABLE
    if task.get("signal") is not None:
        return 128 + int(task["signal"])
    if task.get("exit_code") is not None:
        return int(task["exit_code"]) & 0xFF
    return EXIT_NO_EXIT_CODE


def _node_failure(error: NodeError) -> Failed:
    if error.status == 0:
        return Failed(EXIT_CONNECTION, error.message)
    if error.status == 401:
        return Failed(EXIT_AUTH, "the node refused the secret: it is not the cluster's "
                                 "(--secret / OXIDE_CLUSTER_SECRET)")
    if error.status == 404 and error.code == "task_not_found":
        return Failed(EXIT_NO_TASK, error.message)
    if error.status == 422:
        return Failed(EXIT_UNAVAILABLE, f"no node can run this task: {error.message}")
    if error.status in (429, 503):
        return Failed(EXIT_UNAVAILABLE, f"the node is busy: {error.message}")
    if error.status in (400, 409, 413, 415):
        return Failed(EXIT_BAD_REQUEST, error.message)
    return Failed(EXIT_SOFTWARE, str(error))


def _pause(seconds: float) -> None:
    """Wait between two tries: this CLI is synchronous (no reactor) by design."""
    time.sleep(seconds)


def _pairs(values: list[str], option: str, from_environment: bool = False) -> dict[str, str]:
    result = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            if not from_environment or key not in os.environ:
                raise Failed(EXIT_USAGE, f"{option} {item!r}: expected NAME=VALUE"
                             + (" or the name of a set variable" if from_environment else ""))
            value = os.environ[key]
        if not key:
            raise Failed(EXIT_USAGE, f"{option} {item!r}: empty name")
        result[key] = value
    return result


def settled_state(node: Node, task_id: str, why: str,
                  settle_for: float = SETTLE_FOR) -> dict[str, Any] | None:
    """After the stream of a task broke: ask the cluster until it says the task ended.

    Returns the task JSON once it is terminal (``lost`` when its node died), or None when
    the task still runs and can be followed again. Raises Failed for an unknown id, or
    when no answer comes within ``settle_for`` seconds.
    """
    deadline = time.monotonic() + settle_for
    while True:
        try:
            task: dict[str, Any] = node.request("GET", f"/task/{task_id}")
        except NodeError as error:
            if error.status not in (0, 502, 503, 504):
                raise _node_failure(error) from None
            why = error.message  # the owner is unreachable and not yet recorded lost
        else:
            if task.get("state") in ("queued", "running"):
                return None
            return task
        if time.monotonic() > deadline:
            raise Failed(EXIT_CONNECTION, f"task {task_id}: {why}")
        _pause(RETRY_PAUSE)


def follow(node: Node, task_id: str, offset: int = 0, until_live: bool = False,
           stdout: Sink | None = None, stderr: Sink | None = None) -> dict[str, Any]:
    """Stream a task's output from ``offset``; return the final ``state`` message.

    Reconnects and resumes from the last byte received when the connection drops. When
    the node answers an error for the task (its owner died, no such id), the cluster is
    asked what became of it. With ``until_live``, returns ``{}`` once the output so far
    has been replayed.
    """
    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    deadline = None
    refused_until = None  # errors for a task the cluster says still runs: not for ever
    while True:
        try:
            ws = node.websocket()
        except HandshakeError as error:
            if error.status == 401:
                raise Failed(EXIT_AUTH, "the node refused the secret for /ws") from None
            raise Failed(EXIT_SOFTWARE, str(error)) from None
        except OSError as error:
            deadline = deadline or time.monotonic() + RECONNECT_FOR
            if time.monotonic() > deadline:
                raise Failed(EXIT_CONNECTION, f"cannot reach {node.url}: {error}") from None
            _pause(RETRY_PAUSE)
            continue
        deadline = None
        problem = None
        try:
            ws.send_json({"op": "attach", "task": task_id, "offset": offset})
            for message in ws.messages():
                kind = message.get("type")
                if kind == "output":
                    data = decode_output(message)
                    stream = out if message["stream"] == "stdout" else err
                    stream.write(data)
                    stream.flush()
                    offset = message["offset"] + len(data)
                elif kind == "state":
                    return dict(message)
                elif kind == "live" and until_live:
                    return {}
                elif kind == "error":
                    problem = str(message.get("message"))
                    break
        except (ConnectionClosed, OSError) as error:
            # Dropped (agent restart, network, idle timeout): resume where we were.
            deadline = time.monotonic() + RECONNECT_FOR
            sys.stderr.write(f"oxide-cluster: stream interrupted ({error}); resuming at "
                             f"byte {offset}\n")
        finally:
            ws.close()
        if problem is not None:
            # The node cannot stream it (owner dead, unknown id): the cluster's answer
            # decides the exit code (75 lost, 67 unknown), not the stream's error.
            task = settled_state(node, task_id, problem)
            if task is not None:
                return task
            refused_until = refused_until or time.monotonic() + RECONNECT_FOR
            if time.monotonic() > refused_until:
                raise Failed(EXIT_SOFTWARE, f"task {task_id} runs, but cannot be "
                                            f"followed: {problem}")
            _pause(RETRY_PAUSE)


def request_body(options: argparse.Namespace, command: list[str]) -> dict[str, Any]:
    """The ``POST /execute`` fields that ``run``'s options give (no workspace)."""
    body: dict[str, Any] = {"command": command[0], "args": command[1:]}
    env = _pairs(options.env, "--env")
    if env:
        body["env"] = env
    secret_env = _pairs(options.secret_env, "--secret-env", from_environment=True)
    if secret_env:
        body["secret_env"] = secret_env
    labels = _pairs(options.label, "--label")
    if labels:
        body["labels"] = labels
    for field in ("cwd", "timeout", "idle_timeout", "retries"):
        if getattr(options, field) is not None:
            body[field] = getattr(options, field)
    if options.node_id is not None:
        body["node"] = options.node_id
    if options.tty:
        body["tty"] = True
    for field in ("priority", "group", "queue_timeout"):
        if getattr(options, field) is not None:
            body[field] = getattr(options, field)
    if options.no_queue:
        body["queue"] = False
    return body


def cmd_run(node: Node, options: argparse.Namespace) -> int:
    command = list(options.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise Failed(EXIT_USAGE, "run: give the command after --")
    if options.suite is not None and not options.split:
        # The suite names the durations a --split reads and records; alone it would be
        # silently ignored.
        raise Failed(EXIT_USAGE, "run: --suite NAME needs --split GLOB (with --parallel N; "
                                 "it names the durations the split uses)")
    if options.parallel is not None:
        from oxide_cluster.fanout import run_parallel  # it imports this module
        return run_parallel(node, options, command)
    if options.split or options.junit or options.group_output or options.suite \
            or options.queue_split:
        raise Failed(EXIT_USAGE, "run: --split, --queue-split, --suite, --junit and "
                                 "--group-output need --parallel N")
    body = request_body(options, command)
    if options.workspace is not None:
        body.update(_send_workspace(node, options))
    elif options.artifacts:
        raise Failed(EXIT_USAGE, "run: --artifacts needs --workspace (artifacts are "
                                 "collected from the task's own directory)")
    task_id: str | None = None
    try:
        task = submit(node, body)
        task_id = task["id"]
        # One line to match a CI log with the dashboard.
        sys.stderr.write(f"oxide-cluster: task {task_id} on node {task['node_id']} "
                         f"({node.url}/ui/#task={task_id})\n")
        sys.stderr.flush()
        if task["state"] == "queued":
            task = wait_in_queue(node, task)
            if task.get("started_at"):  # running, or already ended: it did start
                _say(f"started on node {task['node_id']}")
        if task["state"] in ("queued", "running"):
            state = follow(node, task["id"])
        else:
            follow(node, task["id"], until_live=True)
            state = task
        if state.get("state") != "succeeded" and state.get("exit_code") is None:
            sys.stderr.write(f"oxide-cluster: task {task_id} {state.get('state')}: "
                             f"{state.get('reason')}\n")
        line = usage_line(state.get("usage"))
        if line:
            sys.stderr.write(f"oxide-cluster: {line}\n")
        if options.artifacts:
            _fetch_artifacts(node, task_id, options)
        return task_exit_code(state)
    except Interrupted as why:
        if task_id is None:
            sys.stderr.write(f"oxide-cluster: {why} before the task was accepted\n")
            return EXIT_CANCELLED
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.write(f"oxide-cluster: {why}: cancelling task {task_id}\n")
        try:
            node.request("POST", f"/task/{task_id}/cancel?wait=10", timeout=15)
        except NodeError as error:
            sys.stderr.write(f"oxide-cluster: cancel failed: {error}\n")
        if options.artifacts:
            _fetch_artifacts(node, task_id, options)
        return EXIT_CANCELLED


def _say(message: str) -> None:
    sys.stderr.write(f"oxide-cluster: {message}\n")
    sys.stderr.flush()


def submit(node: Node, body: dict[str, Any], say: Callable[[str], None] = _say, *,
           retry_for: float = SUBMIT_RETRY_FOR,
           clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """``POST /execute``, sent again while the cluster answers that it took nothing: a
    leader change or a Redis restart lasts seconds, and a CI job must not fail for it.
    The pause is the answer's ``Retry-After`` (1 to 5 s); after ``retry_for`` seconds
    the last refusal is raised."""
    deadline = clock() + retry_for
    while True:
        try:
            task: dict[str, Any] = node.request("POST", "/execute", body)
            return task
        except NodeError as error:
            if error.status != 503 or error.code not in RETRIED_REFUSALS:
                raise
            try:
                delay = min(max(float(error.headers.get("Retry-After", 1)), 1.0), 5.0)
            except ValueError:
                delay = 1.0
            if clock() + delay > deadline:
                raise
            say(f"not taken ({error.code}: {error.message}); submitting again in "
                f"{delay:g} s")
            _pause(delay)


def wait_in_queue(node: Node, task: dict[str, Any],
                  say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Say where a queued task stands (on each change) until it leaves the queue."""
    said = None
    while task["state"] == "queued":
        position = task.get("queue_position")
        if position is not None and position != said:
            say(f"queued: {position - 1} ahead")
            said = position
        _pause(QUEUE_POLL)
        try:
            task = node.request("GET", f"/task/{urllib.parse.quote(task['id'], safe='')}")
        except NodeError as error:
            raise _node_failure(error) from None
    return task


class UploadProgress:
    """A line on stderr at most every ``every`` seconds while a workspace upload runs:
    a long first upload shows that it moves; one shorter than ``every`` prints nothing."""

    def __init__(self, say: Callable[[str], None], clock: Callable[[], float] = time.monotonic,
                 every: float = 5.0) -> None:
        self._say = say
        self._clock = clock
        self._every = every
        self._started = clock()
        self._last = self._started

    def __call__(self, done: int, total: int) -> None:
        now = self._clock()
        if now - self._last < self._every or total <= 0:
            return
        self._last = now
        rate = done / (now - self._started)
        self._say(f"workspace upload: {done / 2**20:.0f} of {total / 2**20:.0f} MiB "
                  f"({100 * done / total:.0f} %), {rate / 2**20:.1f} MiB/s")


def _send_workspace(node: Node, options: argparse.Namespace) -> dict[str, Any]:
    """Upload ``--workspace`` by content (only the blobs the cluster lacks) and return the
    request fields that run the task in it."""
    if options.cwd is not None and options.cwd.startswith("/"):
        raise Failed(EXIT_USAGE, "run: with --workspace, --cwd is relative to the workspace")
    try:
        sent = upload_workspace(node, options.workspace, options.exclude,
                                UploadProgress(_say))
    except WorkspaceError as error:
        raise Failed(EXIT_USAGE, f"run: --workspace {options.workspace}: {error}") from None
    except NodeError as error:
        raise _node_failure(error) from None
    sys.stderr.write(f"oxide-cluster: workspace {options.workspace}: {sent.files} files, "
                     f"{sent.total_bytes} bytes; sent {sent.uploaded_blobs} blobs, "
                     f"{sent.uploaded_bytes} bytes\n")
    fields: dict[str, Any] = {"workspace": sent.digest}
    if options.artifacts:
        fields["artifacts"] = options.artifacts
    return fields


def _fetch_artifacts(node: Node, task_id: str, options: argparse.Namespace) -> None:
    """Download the task's artifacts and summarise JUnit reports. A failure here is said
    on stderr but does not replace the task's own exit code."""
    directory = options.artifacts_dir or os.path.join("oxide-artifacts", task_id)
    try:
        written = download_artifacts(node, task_id, directory)
    except (WorkspaceError, NodeError, OSError) as error:
        sys.stderr.write(f"oxide-cluster: artifacts of task {task_id} not downloaded: "
                         f"{error}\n")
        return
    sys.stderr.write(f"oxide-cluster: {len(written)} artifacts in {directory}\n")
    for path, summary in junit_summaries(written):
        sys.stderr.write(f"oxide-cluster: junit {summary.line(str(path))}\n")


def cmd_logs(node: Node, options: argparse.Namespace) -> int:
    state = follow(node, options.task, until_live=not options.follow)
    if state and state.get("state") == "lost":
        sys.stderr.write(f"oxide-cluster: task {options.task} lost: {state.get('reason')}\n")
    return task_exit_code(state) if state else 0


def cmd_status(node: Node, options: argparse.Namespace) -> int:
    task = node.request("GET", f"/task/{options.task}")
    print(json.dumps(task, indent=2))
    return 0


def cmd_cancel(node: Node, options: argparse.Namespace) -> int:
    task = node.request("POST", f"/task/{options.task}/cancel?wait=10", timeout=15)
    print(f"{task['id']} {task['state']}")
    return 0


def drain_line(state: dict[str, Any]) -> str:
    """``draining since ...: 2 running, 0 queued`` from a DrainState."""
    if not state.get("draining"):
        head = "not draining"
    else:
        head = f"draining since {state.get('since')}"
        if state.get("deadline"):
            head += f", running tasks cancelled at {state['deadline']}"
    return f"{head}: {state.get('running', 0)} running, {state.get('queued', 0)} queued"


def cmd_node_drain(node: Node, options: argparse.Namespace) -> int:
    path = "/node/drain"
    if options.deadline is not None:
        path += f"?deadline={options.deadline:g}"
    print(drain_line(node.request("POST", path)))
    return 0


def cmd_node_resume(node: Node, options: argparse.Namespace) -> int:
    print(drain_line(node.request("POST", "/node/resume")))
    return 0


def cmd_tasks(node: Node, options: argparse.Namespace) -> int:
    query = f"?limit={options.limit}" + (f"&state={options.state}" if options.state else "")
    if options.scope != "local":
        query += f"&scope={options.scope}"
    page = node.request("GET", "/tasks" + query)
    for task in page["tasks"]:
        code = "" if task["exit_code"] is None else task["exit_code"]
        command = " ".join([task["command"], *task["args"]])
        print(f"{task['id']}  {task['state']:<9}  {code!s:>4}  {command}")
    if page.get("unreachable"):
        sys.stderr.write("oxide-cluster: these nodes did not answer: "
                         + ", ".join(page["unreachable"]) + "\n")
    return 0


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--node`` and ``--secret``, accepted before and after the subcommand: the
    subcommands' copies default to SUPPRESS so they never overwrite the top level's."""
    parser.add_argument("--node", metavar="URL", default=default,
                        help="node URL with its scheme, e.g. http://ci-pool:4000 "
                             "(env OXIDE_NODE)")
    parser.add_argument("--secret", default=default,
                        help="cluster secret (env OXIDE_CLUSTER_SECRET, preferred: a "
                             "command line is visible to other users)")


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    plain = argparse.RawDescriptionHelpFormatter
    top = argparse.ArgumentParser(
        prog="oxide-cluster", formatter_class=plain, epilog=exit_codes_text(),
        description=textwrap.fill(
            "Run commands on an oxide-cluster node and follow them, from CI. The options "
            "--node and --secret go before or after the subcommand."))
    _global_options(top, None)
    commands = top.add_subparsers(dest="action", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run", parents=[common], help="run a command, stream its output, exit with its code",
        formatter_class=plain, epilog=exit_codes_text(),
        description=textwrap.fill(
            "Run CMD on a node and stream its output. The first line on stderr names the "
            "task, its node and its dashboard link. Without --tty, set PYTHONUNBUFFERED=1 "
            "(--env PYTHONUNBUFFERED=1) or pass --color=yes to the test runner for output "
            "that arrives as it is written, in colour."))
    run.add_argument("--env", action="append", default=[], metavar="K=V",
                     help="environment variable for the task (repeatable)")
    run.add_argument("--secret-env", action="append", default=[], metavar="K[=V]",
                     help="passed to the task, never shown; K alone takes $K from here")
    run.add_argument("--label", action="append", default=[], metavar="K=V",
                     help="run on a node with this label (repeatable)")
    run.add_argument("--node-id", metavar="ID",
                     help="run on this node id (the API's node field)")
    run.add_argument("--retries", type=int, metavar="N",
                     help="run again elsewhere up to N times (0-10) if its node dies")
    run.add_argument("--priority", type=int, metavar="N",
                     help="queue priority: higher starts first (default 0)")
    run.add_argument("--group", metavar="NAME",
                     help="fair-share group: groups of one priority take turns (default: "
                     "this client's address)")
    run.add_argument("--queue-timeout", type=float, metavar="S",
                     help="give up (exit 69) if the task has not started after S seconds "
                     "in the queue (default: the node's queue_timeout)")
    run.add_argument("--no-queue", action="store_true",
                     help="fail at once (exit 69) instead of queueing when the pool is full")
    run.add_argument("--tty", action="store_true",
                     help="run on a pseudo-terminal (colours, line buffering); stdout and "
                          "stderr then arrive as one stream, on stdout")
    run.add_argument("--cwd", help="working directory on the node: absolute, or relative "
                     "to the workspace with --workspace")
    run.add_argument("--workspace", metavar="DIR",
                     help="send DIR by content (git: tracked and untracked-not-ignored "
                     "files) and run the task in a fresh copy of it")
    run.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                     help="leave matching paths out of the workspace (repeatable)")
    run.add_argument("--artifacts", action="append", default=[], metavar="GLOB",
                     help="after the task, download matching files of its directory "
                     "(repeatable; needs --workspace)")
    run.add_argument("--artifacts-dir", metavar="OUT",
                     help="where artifacts go (default ./oxide-artifacts/TASK_ID/; with "
                     "--parallel OUT/shard-I/ per shard, OUT defaulting to "
                     "./oxide-artifacts/GROUP or the first shard's task id)")
    run.add_argument("--parallel", type=int, metavar="N",
                     help="run N shards of CMD at once (one workspace upload), each with "
                     "OXIDE_SHARD_INDEX/OXIDE_SHARD_TOTAL, CI_NODE_INDEX/CI_NODE_TOTAL and "
                     "BUILDKITE_PARALLEL_JOB(_COUNT); output prefixed [i/N]; exits with the "
                     "lowest-numbered failing shard's code")
    run.add_argument("--split", action="append", default=[], metavar="GLOB",
                     help="with --parallel and --workspace: split the workspace files "
                     "matching GLOB (repeatable) over the shards, balanced by the durations "
                     "earlier runs of the suite recorded (by size without them), and put "
                     "each shard's files in place of the {files} argument of CMD")
    run.add_argument("--queue-split", action="store_true",
                     help="with --split: instead of one fixed part per shard, N workers "
                     "take batches of the files from a queue until it is empty (batches "
                     "shrink toward the end); a batch whose task is lost or killed by a "
                     "signal goes back to the queue")
    run.add_argument("--suite", metavar="NAME",
                     help="with --split: the name the cluster keeps the files' durations "
                     "under (default: the workspace directory's name)")
    run.add_argument("--junit", action="append", default=[], metavar="GLOB",
                     help="with --parallel and --workspace: collect JUnit XML reports "
                     "matching GLOB from every shard and merge them into OUT/junit.xml")
    run.add_argument("--group-output", action="store_true",
                     help="with --parallel: print each shard's output in one piece when "
                     "all have ended, in shard order, instead of prefixed lines as they come")
    run.add_argument("--timeout", type=float, help="wall-clock limit in seconds")
    run.add_argument("--idle-timeout", type=float, help="limit on seconds without output")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                     help="the command and its arguments, after --")
    run.set_defaults(handler=cmd_run)
    for name, handler, text in (("status", cmd_status, "show a task as JSON"),
                                ("cancel", cmd_cancel, "cancel a running task")):
        sub = commands.add_parser(name, parents=[common], help=text, description=text)
        sub.add_argument("task", help="the task id")
        sub.set_defaults(handler=handler)
    logs = commands.add_parser("logs", parents=[common], help="print a task's output",
                               description="Print a task's output.",
                               formatter_class=plain, epilog=exit_codes_text())
    logs.add_argument("task", help="the task id")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep streaming until the task ends; exit with its code")
    logs.set_defaults(handler=cmd_logs)
    tasks = commands.add_parser("tasks", parents=[common], help="list recent tasks",
                                description="List recent tasks, newest first.")
    tasks.add_argument("--state", help="only tasks in this state (running, failed, ...)")
    tasks.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    tasks.add_argument("--scope", choices=("local", "cluster"), default="local",
                       help="local: the node's tasks; cluster: every healthy node's")
    tasks.set_defaults(handler=cmd_tasks)
    node_help = "drain a node (take no new tasks) or resume it"
    node_cmd = commands.add_parser("node", help=node_help, description=node_help)
    node_actions = node_cmd.add_subparsers(dest="node_action", required=True,
                                           metavar="ACTION")
    drain = node_actions.add_parser(
        "drain", parents=[common], help="take no new tasks; running ones finish",
        description="Take no new tasks (the scheduler places elsewhere, /ready answers "
                    "503); running tasks finish, or are cancelled after --deadline.")
    drain.add_argument("--deadline", type=float, metavar="S",
                       help="cancel the tasks still running S seconds from now")
    drain.set_defaults(handler=cmd_node_drain)
    resume = node_actions.add_parser("resume", parents=[common],
                                     help="take tasks again (end a drain)",
                                     description="End a drain: take tasks again and start "
                                                 "the queued ones.")
    resume.set_defaults(handler=cmd_node_resume)
    return top


def check_node_url(url: str | None) -> str:
    """The node URL, or Failed(EXIT_USAGE) saying what is wrong with it."""
    if not url:
        raise Failed(EXIT_USAGE, "give --node URL or set OXIDE_NODE")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        hint = f"http://{url}" if "://" not in url else "http://HOST:PORT"
        raise Failed(EXIT_USAGE, f"node URL {url!r} needs http:// or https://, "
                                 f"e.g. {hint}")
    return url


def main(argv: list[str] | None = None) -> None:
    options = parser().parse_args(argv)
    try:
        url = check_node_url(options.node or os.environ.get("OXIDE_NODE"))
        secret = options.secret or os.environ.get("OXIDE_CLUSTER_SECRET")
        if not secret:
            raise Failed(EXIT_AUTH, f"no cluster secret: {SECRET_HELP}")
    except Failed as failure:
        sys.stderr.write(f"oxide-cluster: {failure}\n")
        raise SystemExit(failure.code) from None
    node = Node(url, secret)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = options.handler(node, options)
    except Failed as failure:
        sys.stderr.write(f"oxide-cluster: {failure}\n")
        code = failure.code
    except NodeError as error:
        mapped = _node_failure(error)
        sys.stderr.write(f"oxide-cluster: {mapped}\n")
        code = mapped.code
    except Interrupted:
        code = EXIT_CANCELLED
    except BrokenPipeError:
        code = EXIT_CONNECTION
    raise SystemExit(code)


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: oxide_cluster.fanout imports
    # oxide_cluster.cli, and its Failed and Interrupted must be the classes main catches.
    from oxide_cluster.cli import main as module_main
    module_main()

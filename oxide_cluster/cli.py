"""``oxide-cluster``: run a command on a node from CI and exit with its exit code.

    oxide-cluster run --node URL [--secret S] [--env K=V]... [--secret-env K[=V]]...
                      [--cwd D] [--timeout S] [--idle-timeout S] [--label K=V]... -- CMD ARGS...
    oxide-cluster status ID | logs ID [--follow] | cancel ID | tasks [--state S]

The node URL comes from ``--node`` or ``OXIDE_NODE``, the secret from ``--secret`` or
``OXIDE_CLUSTER_SECRET``. ``run`` streams the task's stdout to stdout and its stderr to
stderr over the WebSocket as the output arrives; a dropped connection is resumed from the
last byte received. Ctrl-C (SIGINT) or SIGTERM cancels the remote task.
``--secret-env NAME`` (no ``=``) passes this process's ``$NAME`` without putting the
value on the command line.

Exit codes of ``run`` (and of ``logs --follow`` once the task ends):

    0-123    the task's own exit code
    124      the task timed out (as coreutils ``timeout``)
    125      the task was cancelled (also after Ctrl-C/SIGTERM here)
    126      the task failed without an exit code (command not found, bad cwd)
    128+N    the task was killed by signal N
    2        usage error (bad options)
    65       the node rejected the request (400: bad field)
    69       the node is at capacity (429/503) or refused the task
    70       unexpected reply from the node
    74       the node cannot be reached or the stream was lost for good
    75       the task was lost (its agent restarted)
    77       authentication failed (wrong or missing secret)

A task exit code from 124 up collides with these; use ``status`` to tell them apart.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, BinaryIO

from oxide_cluster.client import (
    ConnectionClosed,
    HandshakeError,
    Node,
    NodeError,
    decode_output,
)

EXIT_TIMED_OUT = 124
EXIT_CANCELLED = 125
EXIT_NO_EXIT_CODE = 126
EXIT_USAGE = 2
EXIT_BAD_REQUEST = 65
EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70
EXIT_CONNECTION = 74
EXIT_LOST = 75
EXIT_AUTH = 77
RECONNECT_FOR = 30.0
EXIT_CODES_HELP = "exit codes" + (__doc__ or "").split("Exit codes", 1)[-1]


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: cancel the remote task."""


class Failed(Exception):
    """End the CLI with ``code`` after printing ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


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
        return Failed(EXIT_AUTH, "the node refused the secret (--secret / "
                                 "OXIDE_CLUSTER_SECRET)")
    if error.status in (429, 503):
        return Failed(EXIT_UNAVAILABLE, f"the node is busy: {error.message}")
    if error.status in (400, 404, 409, 413, 415):
        return Failed(EXIT_BAD_REQUEST, error.message)
    return Failed(EXIT_SOFTWARE, str(error))


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


def follow(node: Node, task_id: str, offset: int = 0, until_live: bool = False,
           stdout: BinaryIO | None = None, stderr: BinaryIO | None = None) -> dict[str, Any]:
    """Stream a task's output from ``offset``; return the final ``state`` message.

    Reconnects and resumes from the last byte received when the connection drops. With
    ``until_live``, returns ``{}`` once the output so far has been replayed.
    """
    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    deadline = None
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
            time.sleep(0.5)
            continue
        deadline = None
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
                    raise Failed(EXIT_BAD_REQUEST, str(message.get("message")))
        except (ConnectionClosed, OSError) as error:
            # Dropped (agent restart, network, idle timeout): resume where we were.
            deadline = time.monotonic() + RECONNECT_FOR
            sys.stderr.write(f"oxide-cluster: stream interrupted ({error}); resuming at "
                             f"byte {offset}\n")
        finally:
            ws.close()


def cmd_run(node: Node, options: argparse.Namespace) -> int:
    command = list(options.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise Failed(EXIT_USAGE, "run: give the command after --")
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
    for field in ("cwd", "timeout", "idle_timeout"):
        if getattr(options, field) is not None:
            body[field] = getattr(options, field)
    task_id: str | None = None
    try:
        task = node.request("POST", "/execute", body)
        task_id = task["id"]
        if task["state"] in ("queued", "running"):
            state = follow(node, task["id"])
        else:
            follow(node, task["id"], until_live=True)
            state = task
        if state.get("state") != "succeeded" and state.get("exit_code") is None:
            sys.stderr.write(f"oxide-cluster: task {task_id} {state.get('state')}: "
                             f"{state.get('reason')}\n")
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
        return EXIT_CANCELLED


def cmd_logs(node: Node, options: argparse.Namespace) -> int:
    state = follow(node, options.task, until_live=not options.follow)
    return task_exit_code(state) if state else 0


def cmd_status(node: Node, options: argparse.Namespace) -> int:
    task = node.request("GET", f"/task/{options.task}")
    print(json.dumps(task, indent=2))
    return 0


def cmd_cancel(node: Node, options: argparse.Namespace) -> int:
    task = node.request("POST", f"/task/{options.task}/cancel?wait=10", timeout=15)
    print(f"{task['id']} {task['state']}")
    return 0


def cmd_tasks(node: Node, options: argparse.Namespace) -> int:
    query = f"?limit={options.limit}" + (f"&state={options.state}" if options.state else "")
    for task in node.request("GET", "/tasks" + query)["tasks"]:
        code = "" if task["exit_code"] is None else task["exit_code"]
        command = " ".join([task["command"], *task["args"]])
        print(f"{task['id']}  {task['state']:<9}  {code!s:>4}  {command}")
    return 0


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--node", default=os.environ.get("OXIDE_NODE"),
                        help="node URL, e.g. http://ci-pool:4000 (env OXIDE_NODE)")
    common.add_argument("--secret", default=os.environ.get("OXIDE_CLUSTER_SECRET"),
                        help="cluster secret (env OXIDE_CLUSTER_SECRET; prefer the env)")
    top = argparse.ArgumentParser(
        prog="oxide-cluster", description="Run commands on an oxide-cluster node.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="action", required=True)
    run = commands.add_parser("run", parents=[common], help="run a command, stream output",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=EXIT_CODES_HELP)
    run.add_argument("--env", action="append", default=[], metavar="K=V")
    run.add_argument("--secret-env", action="append", default=[], metavar="K[=V]",
                     help="passed to the task, never shown; K alone takes $K from here")
    run.add_argument("--label", action="append", default=[], metavar="K=V")
    run.add_argument("--cwd", help="absolute working directory on the node")
    run.add_argument("--timeout", type=float, help="wall-clock limit in seconds")
    run.add_argument("--idle-timeout", type=float, help="limit on seconds without output")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    run.set_defaults(handler=cmd_run)
    for name, handler, text in (("status", cmd_status, "show a task as JSON"),
                                ("cancel", cmd_cancel, "cancel a running task")):
        sub = commands.add_parser(name, parents=[common], help=text)
        sub.add_argument("task")
        sub.set_defaults(handler=handler)
    logs = commands.add_parser("logs", parents=[common], help="print a task's output")
    logs.add_argument("task")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep streaming until the task ends; exit with its code")
    logs.set_defaults(handler=cmd_logs)
    tasks = commands.add_parser("tasks", parents=[common], help="list recent tasks")
    tasks.add_argument("--state")
    tasks.add_argument("--limit", type=int, default=50)
    tasks.set_defaults(handler=cmd_tasks)
    return top


def main(argv: list[str] | None = None) -> None:
    options = parser().parse_args(argv)
    if not options.node:
        sys.stderr.write("oxide-cluster: give --node URL or set OXIDE_NODE\n")
        raise SystemExit(EXIT_USAGE)
    node = Node(options.node, options.secret)
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
    main()

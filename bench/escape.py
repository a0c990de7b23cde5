"""Cancel of task trees that escape: each task starts a ``setsid`` daemon and a
double-forked orphan, then runs on; the bench cancels them all and counts what is left.

    python -m bench.escape [--tasks 1000] [--batch 100]

Tasks run ``--batch`` at a time (each tree is 4 processes); every batch is started, its
escapes seen running, then cancelled at once. Measured: the time from the first cancel
to the last task recorded ``cancelled`` (the agent records a task with a cgroup as ended
only once its cgroup is empty), and the escaped processes still alive after that (goal
0). The baseline is the same with ``--cgroups off`` (process groups only), whose escapes
survive; the bench kills those itself afterwards.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

from bench.common import Client, LocalAgent, print_table


def _script(marker: str) -> str:
    quiet = "</dev/null >/dev/null 2>&1"
    return (f"setsid sleep {marker} {quiet} & (sleep {marker} {quiet} &); "
            f"exec sleep {marker}")


def _with_marker(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if len(cmdline) == 2 and cmdline[1] == marker:
            found.append(process)
    return found


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def measure(count: int, batch: int, *extra: str) -> dict[str, Any]:
    """Start and cancel ``count`` escaping trees, ``batch`` at a time, on one agent."""
    marker = f"299.{secrets.randbelow(10 ** 8):08d}"
    cancel_seconds: list[float] = []
    left = 0
    mode = "?"
    with LocalAgent("--max-tasks", str(batch), *extra) as agent:
        mode = Client(agent.port).call("GET", "/ready")[1].get("cgroups", "?")
        local = threading.local()  # one keep-alive connection per worker thread

        def client() -> Client:
            if not hasattr(local, "client"):
                local.client = Client(agent.port)
            return local.client

        with ThreadPoolExecutor(8) as pool:
            for start in range(0, count, batch):
                size = min(batch, count - start)

                def submit(index: int) -> str:
                    status, body = client().call(
                        "POST", "/execute", {"command": "sh", "args": ["-c", _script(marker)],
                                             "queue": False})
                    assert status in (200, 202), (status, body)
                    return str(body["id"])

                ids = list(pool.map(submit, range(size)))
                _wait_for(lambda want=3 * size + left: len(_with_marker(marker)) >= want,
                          120, "every tree to escape")
                began = time.monotonic()

                def cancel(task_id: str) -> str:
                    client().call("POST", f"/task/{task_id}/cancel")
                    status, body = client().call("GET", f"/task/{task_id}?wait=60")
                    assert status == 200, (status, body)
                    return str(body["state"])

                states = list(pool.map(cancel, ids))
                cancel_seconds.append(time.monotonic() - began)
                assert set(states) == {"cancelled"}, set(states)
                left = len(_with_marker(marker))
    stray = _with_marker(marker)
    for process in stray:  # the baseline's survivors: not left on the machine
        try:
            process.kill()
        except psutil.Error:
            pass
    return {"tasks": count, "batch": batch, "mode": mode, "left": len(stray),
            "cancel_seconds": cancel_seconds,
            "cancel_seconds_total": sum(cancel_seconds),
            "per_batch_median": statistics.median(cancel_seconds)}


def rows(figures: dict[str, Any], baseline: dict[str, Any]) -> list[list[str]]:
    """Rows of ``python -m bench``'s table."""
    return [
        ["escape", f"cancel {figures['tasks']} setsid+double-fork trees "
                   f"({figures['batch']} at a time, {figures['mode']})",
         f"{figures['cancel_seconds_total']:.1f} s", "-", "-", "-", "-"],
        ["escape", "escaped processes left after cancel", str(figures["left"]),
         f"--cgroups off ({baseline['tasks']} trees)", str(baseline["left"]), "-", "0"],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    options = parser.parse_args()
    figures = measure(options.tasks, options.batch)
    baseline = measure(min(options.tasks, options.batch), options.batch, "--cgroups", "off")
    print_table("cancel of escaping task trees",
                ["section", "measure", "oxide", "baseline", "baseline value", "ratio",
                 "goal"], rows(figures, baseline))


if __name__ == "__main__":
    main()

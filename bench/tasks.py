"""End-to-end tasks/s of ``/bin/true`` over HTTP against the raw spawn rate, same run.

    python -m bench.tasks [--tasks 600] [--clients 8]

Each client submits ``POST /execute?wait=30`` on a keep-alive connection and waits for
the result, so a task counts once it has run and its final state is committed.
"""

from __future__ import annotations

import argparse

from bench.common import Client, LocalAgent, http_rate, print_table, raw_spawn_rate, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--clients", type=int, default=8)
    options = parser.parse_args()
    raw = raw_spawn_rate(options.tasks)
    # The default (cgroups where the host has them) and process groups only: the price
    # of a cgroup per task, measured in the same run.
    rates: dict[str, tuple[float, int]] = {}
    for label, extra in (("default isolation", ()), ("--cgroups off", ("--cgroups", "off"))):
        with LocalAgent("--max-tasks", str(options.clients), *extra) as agent:
            mode = Client(agent.port).call("GET", "/ready")[1].get("cgroups", "?")
            http_rate(agent.port, 50, options.clients)  # warm up
            rates[f"{label} ({mode})"] = http_rate(agent.port, options.tasks,
                                                   options.clients)[:2]
    rows = [["raw subprocess.run(/bin/true), 1 thread", f"{raw:.0f}", "1.00"]]
    rows += [[f"HTTP /execute?wait, {options.clients} clients, {label}", f"{rate:.0f}",
              f"{rate / raw:.2f}"] for label, (rate, _) in rates.items()]
    rate, refused = next(iter(rates.values()))  # the default, as saved before
    print_table(f"tasks/s, {options.tasks} tasks of /bin/true", ["path", "tasks/s", "ratio"],
                rows)
    print(f"capacity refusals retried: {refused}")
    path = save("tasks", {"raw_spawn_per_s": raw, "http_per_s": rate, "ratio": rate / raw,
                          "tasks": options.tasks, "clients": options.clients,
                          "refused": refused})
    print(f"saved {path}")


if __name__ == "__main__":
    main()

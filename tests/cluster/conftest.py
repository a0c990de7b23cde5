"""Fixtures for the multi-host suite: namespaced networks, redis, logs on failure."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import harness


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/cluster is a cluster test (select with ``-m cluster``)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Stash each phase's report on the item so fixtures can see if the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(request.node, f"rep_{when}", None) is not None
               and getattr(request.node, f"rep_{when}").failed
               for when in ("setup", "call"))


def _dump_logs(paths: list[Path]) -> None:
    for path in paths:
        text = path.read_text(errors="replace") if path.exists() else "(missing)"
        sys.stderr.write(f"\n===== {path.name} =====\n{text[-20000:]}\n")


@pytest.fixture(scope="session", autouse=True)
def _cleanup_stale_runs() -> None:
    """Remove what a crashed earlier run left behind (dead owners only)."""
    with contextlib.suppress(Exception):
        harness.cleanup_stale()


@pytest.fixture
def network(request: pytest.FixtureRequest, tmp_path: Path
            ) -> Iterator[Callable[[int], harness.Network]]:
    """Factory: ``net = network(3)``; every network is torn down after the test.

    Skips when namespaces cannot be created (not root). On failure, every log file of
    every process the networks started is printed.
    """
    stack = contextlib.ExitStack()
    nets: list[harness.Network] = []

    def make(n_hosts: int) -> harness.Network:
        log_dir = tmp_path / f"net{len(nets) + 1}"
        try:
            net = stack.enter_context(harness.Network("ox", n_hosts, log_dir))
        except harness.HarnessUnavailable as exc:
            pytest.skip(f"multi-host harness unavailable: {exc}")
        nets.append(net)
        return net

    try:
        yield make
    finally:
        if _failed(request):
            _dump_logs([p for net in nets for p in net.log_files()])
        stack.close()


@pytest.fixture
def redis_server() -> Callable[..., harness.RedisServer]:
    """Factory: ``redis = redis_server(net)`` starts redis-server on the net's bridge IP
    (``appendonly=True``: persisted in an append-only file, kept across restarts).

    The network owns the process, so the network's teardown stops it.
    """
    def make(net: harness.Network, appendonly: bool = False) -> harness.RedisServer:
        return harness.RedisServer(net, appendonly=appendonly).start()
    return make


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: a long scenario (about a minute); still part of every CI run")


@pytest.fixture
def cluster(network: Callable[[int], harness.Network], tmp_path: Path
            ) -> Callable[..., Any]:
    """Factory: ``c = cluster(3)`` starts a real agent per host and waits for /ready.

    ``extra_args`` go to every agent's command line. Teardown (and log dump on failure)
    belongs to the ``network`` fixture.
    """
    import oxide  # lazily: the harness self-test copies this conftest without oxide.py

    def make(n_hosts: int, extra_args: tuple[str, ...] = (), mesh: bool = True
             ) -> Any:
        net = network(n_hosts)
        c = oxide.Cluster(net, tmp_path / f"{net.log_dir.name}-agents", extra_args)
        c.start(net.hosts)
        if mesh:
            c.wait_meshed()
        return c
    return make


# --------------------------------------------------------------------------- fault report

FAULT_REPORT_COLUMNS = ("scenario", "faults injected", "submitted", "accepted", "finished",
                        "lost", "unknown", "refused", "leader changes", "split-brain", "orphans",
                        "killed w/ agent", "ran twice")
_fault_rows: list[dict[str, Any]] = []


@pytest.fixture(scope="session")
def fault_report() -> list[dict[str, Any]]:
    """Rows (dicts keyed by FAULT_REPORT_COLUMNS) that fault scenarios append; the table
    is printed at the end of the session."""
    return _fault_rows


def format_fault_report(rows: list[dict[str, Any]]) -> list[str]:
    table = [list(FAULT_REPORT_COLUMNS)] + [
        [str(row.get(col, "")) for col in FAULT_REPORT_COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(FAULT_REPORT_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _fault_rows:
        terminalreporter.write_sep("=", "fault injection report")
        for line in format_fault_report(_fault_rows):
            terminalreporter.write_line(line)

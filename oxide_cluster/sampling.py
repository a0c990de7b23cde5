"""Usage of a task without a cgroup (mode ``off``): samples of its process tree.

Every ``INTERVAL`` the tree under the task's process (psutil: the process and its
descendants) is read: CPU seconds per process (the last figure each had), the sum of
resident memory and the number of processes, keeping the peaks. When the main process
is reaped, the agent's ``RUSAGE_CHILDREN`` grows by its exact CPU time and that of the
children it waited for (:class:`ReapAccount`); the task reports the larger of the two
CPU figures. The result is marked ``"source": "sampled"``: a process that escaped the
tree (``setsid`` and reparented to init), or lived between two samples, is missed, and
memory peaks between samples are not seen. A cgroup counts all of it exactly.
"""

from __future__ import annotations

import resource

import psutil

from oxide_cluster.cgroups import Usage

INTERVAL = 0.25


class ReapAccount:
    """CPU seconds of the agent's reaped children, taken as each task's process is reaped
    (Twisted calls ``processExited`` right after that process's ``waitpid``, so the
    growth since the previous take is that process's, plus any helper process the agent
    reaped in between)."""

    def __init__(self) -> None:
        self._last = self._children()

    @staticmethod
    def _children() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def take(self) -> float:
        now = self._children()
        grown, self._last = max(0.0, now - self._last), now
        return grown


REAPED = ReapAccount()


class TreeSampler:
    """Peaks of one process tree, from samples."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._cpu: dict[tuple[int, float], float] = {}
        self.memory_peak = 0
        self.processes_peak = 0

    def sample(self) -> None:
        """Read the tree now (it may be gone: then nothing changes)."""
        try:
            root = psutil.Process(self._pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        memory = count = 0
        for process in tree:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    rss = process.memory_info().rss
                    key = (process.pid, process.create_time())
            except psutil.Error:
                continue
            self._cpu[key] = times.user + times.system
            memory += rss
            count += 1
        self.memory_peak = max(self.memory_peak, memory)
        self.processes_peak = max(self.processes_peak, count)

    def usage(self, reaped_cpu: float = 0.0) -> Usage:
        cpu = max(sum(self._cpu.values()), reaped_cpu)
        return Usage(cpu_seconds=round(cpu, 3), memory_peak_bytes=self.memory_peak or None,
                     processes_peak=self.processes_peak or None, source="sampled")

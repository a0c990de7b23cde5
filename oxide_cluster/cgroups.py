"""A control group per task: limits, whole-tree kill, and usage from the kernel's accounting.

One provider per host layout, behind one small interface (:class:`CgroupProvider` makes a
:class:`TaskCgroup` per task):

* ``v2``: a delegated cgroup v2 subtree (the agent's own cgroup, e.g. a systemd unit with
  ``Delegate=yes``, or ``cgroup_root``). The agent moves itself into a leaf ``agent``
  child (a v2 cgroup with controllers enabled for its children holds no processes) and
  makes each task a child of ``oxide-<node id>``.
* ``v1``: the v1 ``memory``, ``cpu``, ``cpuacct``, ``pids`` and ``freezer`` hierarchies,
  plus the v2 unified hierarchy (if mounted and writable) only for ``cgroup.kill``.
* ``off``: no cgroup (an unprivileged container): process groups as before.

How a child enters its cgroup: ``posix_spawn`` starts a small ``sh`` that writes its own
pid into each ``cgroup.procs`` and then execs the command (``executor._ENTER_SCRIPT``;
``exec "$@"`` keeps ``argv[0]``); where sh cannot run it the same way, the fork path's
child does the writes between ``fork`` and ``exec`` (``executor._enter_cgroups``). The
extra exec is far cheaper than forking the agent (bench.tasks on v1: ~45 → ~140 tasks/s).
Moving the pid from the parent after ``posix_spawn`` is racy (the command may fork first,
and that child stays outside) and ``clone3(CLONE_INTO_CGROUP)`` is out of Python's reach.

On v1 an emptied task cgroup goes back to a pool for the next task
(:meth:`V1Provider.release`) when its accounting can be made to look new; v2 cannot reset
``memory.peak``, so there each task's cgroup is removed.
"""

from __future__ import annotations

import errno
import math
import os
import re
import signal
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs

MODES = ("auto", "v2", "v1", "off")
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
V1_REQUIRED = ("memory", "cpu", "pids")
V2_CONTROLLERS = ("cpu", "memory", "pids")
CPU_PERIOD_US = 100_000
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
MAX_CPUS = 4096.0
MAX_PIDS = 4_194_304


class ResourceError(ValueError):
    """A resource declaration is malformed; ``field`` names the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class CgroupUnavailable(RuntimeError):
    """The configured cgroup mode cannot be used on this host (the message says why)."""


def parse_size(field: str, value: Any) -> int:
    """Bytes from a number or ``"512M"``/``"2G"``/``"1.5GiB"`` (binary units)."""
    if isinstance(value, bool):
        raise ResourceError(field, "must be a number of bytes or a size like '2G'")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ResourceError(field, "must be a number of bytes or a size like '2G'")
        number = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    else:
        raise ResourceError(field, "must be a number of bytes or a size like '2G'")
    if number < 1024 * 1024:
        raise ResourceError(field, "must be at least 1M")
    return number


def format_size(number: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if number >= _UNITS[unit] and number % _UNITS[unit] == 0:
            return f"{number // _UNITS[unit]} {unit}iB"
    return f"{number} bytes"


@attrs.frozen
class Resources:
    """Declared limits of a task; None means unlimited."""

    cpus: float | None = None
    memory: int | None = None
    pids: int | None = None

    def over(self, defaults: Resources) -> Resources:
        """These declarations, each missing one taken from ``defaults``."""
        return Resources(
            cpus=self.cpus if self.cpus is not None else defaults.cpus,
            memory=self.memory if self.memory is not None else defaults.memory,
            pids=self.pids if self.pids is not None else defaults.pids)

    def to_json(self) -> dict[str, Any]:
        return {name: value for name, value in attrs.asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> Resources:
        return cls(**value) if value else cls()


def parse_resources(value: Any, field: str = "resources") -> Resources:
    """Validate ``{"cpus": 1.5, "memory": "2G", "pids": 512}`` (every key optional)."""
    if not isinstance(value, Mapping):
        raise ResourceError(field, "must be an object with cpus, memory and/or pids")
    unknown = sorted(set(value) - {"cpus", "memory", "pids"})
    if unknown:
        raise ResourceError(f"{field}.{unknown[0]}", "unknown resource (cpus, memory, pids)")
    cpus = value.get("cpus")
    if cpus is not None:
        if isinstance(cpus, bool) or not isinstance(cpus, int | float) \
                or not math.isfinite(cpus) or not 0.01 <= cpus <= MAX_CPUS:
            raise ResourceError(f"{field}.cpus", f"must be a number from 0.01 to {MAX_CPUS:g}")
        cpus = float(cpus)
    memory = value.get("memory")
    if memory is not None:
        memory = parse_size(f"{field}.memory", memory)
    pids = value.get("pids")
    if pids is not None:
        if isinstance(pids, str) and pids.isdigit():
            pids = int(pids)
        if isinstance(pids, float) and pids.is_integer():
            pids = int(pids)
        if isinstance(pids, bool) or not isinstance(pids, int) or not 1 <= pids <= MAX_PIDS:
            raise ResourceError(f"{field}.pids", f"must be a whole number from 1 to {MAX_PIDS}")
    return Resources(cpus=cpus, memory=memory, pids=pids)


@attrs.frozen
class Usage:
    """What a task consumed; ``source`` says how it was measured (``cgroup``/``sampled``)."""

    cpu_seconds: float | None
    memory_peak_bytes: int | None
    processes_peak: int | None
    source: str

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class TaskCgroup(Protocol):
    """One task's cgroup."""

    @property
    def procs_files(self) -> tuple[str, ...]:
        """The ``cgroup.procs`` files the child writes its pid into before exec."""

    def signal_all(self, number: int) -> None:
        """Send ``number`` to every process in the cgroup (best effort, for SIGTERM)."""

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, including ones that escaped their group."""

    def populated(self) -> bool:
        """True while any process is in the cgroup."""

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer ended for this cgroup's limit."""

    def usage(self) -> Usage:
        """The cgroup's accounting so far."""

    def remove(self) -> None:
        """Remove the (empty) cgroup; raises OSError if it cannot be."""


class CgroupProvider(Protocol):
    """Makes task cgroups for one host layout."""

    @property
    def mode(self) -> str:
        """``v2``, ``v1`` or ``off``."""

    def describe(self) -> dict[str, Any]:
        """Mode and where, for ``/ready``, ``/stats`` and the log."""

    def create(self, name: str, resources: Resources) -> TaskCgroup | None:
        """A new cgroup with these limits (None in ``off`` mode); raises OSError."""

    def release(self, cgroup: TaskCgroup, empty: bool) -> None:
        """The task of ``cgroup`` has ended: remove it, or keep it for a later task when
        it is known ``empty`` and nothing of this task would show there; raises OSError."""

    def close(self) -> None:
        """Remove the (empty) parent cgroup(s) made for the tasks, at agent stop."""

    def leftovers(self) -> list[TaskCgroup]:
        """Task cgroups a previous agent of this node left (it was killed): SIGKILLed
        here; the caller removes each once it is empty."""


def _remove_empty(paths: Iterable[Path]) -> None:
    for path in dict.fromkeys(paths):
        try:
            os.rmdir(path)
        except OSError:
            pass  # a task cgroup still inside (a stuck process): left for the next start


def _children(base: Path) -> list[Path]:
    try:
        return [path for path in base.iterdir() if path.is_dir()]
    except OSError:
        return []


def _kill_quietly(cgroup: TaskCgroup) -> None:
    try:
        cgroup.kill()
    except OSError:
        pass  # gone meanwhile, or no kill file: its removal will say


def _write(path: str | Path, text: str) -> None:
    # os.open/os.write: a cgroup file is one short write, a buffered file object per
    # write was a measurable share of each task's cost.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # as open(path, "w")
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def _read(path: str | Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("ascii")
    except ProcessLookupError:
        return None
    finally:
        os.close(fd)


def _keyed(path: str | Path, key: str) -> int | None:
    """The value of ``key`` in a flat-keyed file like ``memory.events``."""
    text = _read(path)
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return None


def _number(path: str | Path) -> int | None:
    text = (_read(path) or "").strip()
    return int(text) if text.isdigit() else None


def _pids(path: str | Path) -> list[int]:
    return [int(line) for line in (_read(path) or "").split() if line.isdigit()]


Kill = Callable[[int, int], None]


def _signal_pids(pids: Iterable[int], number: int, kill: Kill) -> None:
    for pid in pids:
        try:
            kill(pid, number)
        except ProcessLookupError:
            pass


class V2Cgroup:
    """A task cgroup in a v2 hierarchy: ``cgroup.kill``, ``memory.events``, ``cpu.stat``."""

    def __init__(self, path: Path, kill: Kill = os.kill,
                 rmdir: Callable[[Path], None] = os.rmdir) -> None:
        self.path = path
        self._kill = kill
        self._rmdir = rmdir

    @property
    def procs_files(self) -> tuple[str, ...]:
        return (str(self.path / "cgroup.procs"),)

    def signal_all(self, number: int) -> None:
        _signal_pids(_pids(self.path / "cgroup.procs"), number, self._kill)

    def kill(self) -> None:
        try:
            _write(self.path / "cgroup.kill", "1")
        except FileNotFoundError:  # a kernel before 5.14: signal what is listed
            self.signal_all(signal.SIGKILL)

    def populated(self) -> bool:
        events = _keyed(self.path / "cgroup.events", "populated")
        if events is not None:
            return events != 0
        return bool(_pids(self.path / "cgroup.procs"))

    def oom_kills(self) -> int:
        return _keyed(self.path / "memory.events", "oom_kill") or 0

    def usage(self) -> Usage:
        usec = _keyed(self.path / "cpu.stat", "usage_usec")
        return Usage(cpu_seconds=None if usec is None else usec / 1e6,
                     memory_peak_bytes=_number(self.path / "memory.peak"),
                     processes_peak=_number(self.path / "pids.peak"), source="cgroup")

    def remove(self) -> None:
        try:
            self._rmdir(self.path)
        except FileNotFoundError:
            pass


class V2Provider:
    """Task cgroups as children of ``base`` in a delegated v2 subtree."""

    mode = "v2"

    def __init__(self, base: Path, controllers: Iterable[str], kill: Kill = os.kill,
                 rmdir: Callable[[Path], None] = os.rmdir) -> None:
        self.base = base
        self.controllers = tuple(controllers)
        self._kill = kill
        self._rmdir = rmdir

    def close(self) -> None:
        _remove_empty([self.base])

    def release(self, cgroup: TaskCgroup, empty: bool) -> None:
        # memory.peak and pids.peak cannot be reset (memory.peak only per open file,
        # from 6.12): a v2 cgroup serves one task.
        cgroup.remove()

    def leftovers(self) -> list[TaskCgroup]:
        found: list[TaskCgroup] = []
        for path in _children(self.base):
            cgroup = V2Cgroup(path, self._kill, self._rmdir)
            _kill_quietly(cgroup)
            found.append(cgroup)
        return found

    def describe(self) -> dict[str, Any]:
        return {"mode": "v2", "root": str(self.base), "controllers": list(self.controllers),
                "kill": "cgroup.kill"}

    def create(self, name: str, resources: Resources) -> V2Cgroup:
        path = self.base / name
        os.mkdir(path)
        cgroup = V2Cgroup(path, self._kill, self._rmdir)
        try:
            if resources.cpus is not None:
                quota = max(1000, round(resources.cpus * CPU_PERIOD_US))
                _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            if resources.memory is not None:
                _write(path / "memory.max", str(resources.memory))
                if (path / "memory.swap.max").exists():  # the limit is RAM + swap
                    _write(path / "memory.swap.max", "0")
            if resources.pids is not None:
                _write(path / "pids.max", str(resources.pids))
        except OSError:
            cgroup.remove()
            raise
        return cgroup

    @classmethod
    def delegate(cls, own: Path, node_id: str, kill: Kill = os.kill,
                 rmdir: Callable[[Path], None] = os.rmdir) -> V2Provider:
        """Take over the delegated cgroup ``own``: move its processes (the agent) into a
        leaf ``agent`` child, enable the controllers for children, make the task parent."""
        available = (_read(own / "cgroup.controllers") or "").split()
        controllers = [name for name in V2_CONTROLLERS if name in available]
        residents = _pids(own / "cgroup.procs")
        if residents:
            leaf = own / "agent"
            leaf.mkdir(exist_ok=True)
            for pid in residents:
                try:
                    _write(leaf / "cgroup.procs", str(pid))
                except ProcessLookupError:
                    pass
                except OSError as error:
                    if error.errno != errno.ESRCH:
                        raise
        enable = " ".join(f"+{name}" for name in controllers)
        if enable:
            _write(own / "cgroup.subtree_control", enable)
        base = own / f"oxide-{node_id}"
        base.mkdir(exist_ok=True)
        if enable:
            _write(base / "cgroup.subtree_control", enable)
        return cls(base, controllers, kill, rmdir)


class V1Cgroup:
    """A task cgroup across the v1 hierarchies (and the unified one for ``cgroup.kill``).

    ``limits`` are the limits written into it; a cgroup reused for another task
    (:meth:`V1Provider.release`) rewrites only those that differ."""

    def __init__(self, dirs: Mapping[str, Path], unified: Path | None, kill: Kill = os.kill,
                 rmdir: Callable[[Path], None] = os.rmdir,
                 limits: Resources = Resources()) -> None:
        self.dirs = dict(dirs)
        self.unified = unified
        self._kill = kill
        self._rmdir = rmdir
        self.limits = limits
        # The per-task paths as plain strings, built once: pathlib joins on every read
        # showed in the profile.
        where = unified or self.dirs.get("pids") or self.dirs.get("memory") \
            or next(iter(self.dirs.values()), None)
        self._members_file = f"{where}/cgroup.procs" if where is not None else None
        # The hierarchy ``populated`` reads is joined first: a process that is in any of
        # them is in that one (a child killed between its writes is in no other).
        paths = [*([where] if where is not None else []), *self.dirs.values(),
                 *([unified] if unified else [])]
        self._procs_files = tuple(f"{path}/cgroup.procs" for path in dict.fromkeys(paths))
        memory, pids = self.dirs.get("memory"), self.dirs.get("pids")
        self._memory = str(memory) if memory is not None else None
        self._pids_peak = f"{pids}/pids.peak" if pids is not None else None
        cpuacct = self.dirs.get("cpuacct")
        self._cpuacct = f"{cpuacct}/cpuacct.usage" if cpuacct is not None else None
        self._cpu_stat = f"{unified}/cpu.stat" if unified is not None else None
        self._kill_file = f"{unified}/cgroup.kill" if unified is not None else None
        self._cpu_base = 0.0  # seconds used by earlier tasks (a reused cgroup)
        self._cpu_total: float | None = None  # the last reading, before the base is taken
        self._last_usage: Usage | None = None
        self._last_oom: int | None = None

    @property
    def procs_files(self) -> tuple[str, ...]:
        return self._procs_files

    def _members(self) -> list[int]:
        return _pids(self._members_file) if self._members_file is not None else []

    def signal_all(self, number: int) -> None:
        _signal_pids(self._members(), number, self._kill)

    def kill(self) -> None:
        if self._kill_file is not None and os.path.exists(self._kill_file):
            _write(self._kill_file, "1")
            return
        freezer = self.dirs.get("freezer")
        if freezer is None:
            # No freezer: a forking loop may add a child between read and kill; repeat.
            for _ in range(10):
                members = self._members()
                if not members:
                    return
                _signal_pids(members, signal.SIGKILL, self._kill)
            return
        # Frozen, nothing forks between listing and killing; SIGKILL lands on thaw.
        _write(freezer / "freezer.state", "FROZEN")
        try:
            _signal_pids(_pids(freezer / "cgroup.procs"), signal.SIGKILL, self._kill)
        finally:
            _write(freezer / "freezer.state", "THAWED")

    def populated(self) -> bool:
        return bool(self._members())

    def oom_kills(self) -> int:
        if self._memory is None:
            return 0
        self._last_oom = _keyed(f"{self._memory}/memory.oom_control", "oom_kill") or 0
        return self._last_oom

    def _cpu_seconds(self) -> float | None:
        nanoseconds = _number(self._cpuacct) if self._cpuacct is not None else None
        if nanoseconds is not None:
            return nanoseconds / 1e9
        if self._cpu_stat is not None:
            usec = _keyed(self._cpu_stat, "usage_usec")
            return None if usec is None else usec / 1e6
        return None

    def usage(self) -> Usage:
        total = self._cpu_seconds()
        self._cpu_total = total
        self._last_usage = Usage(
            cpu_seconds=None if total is None else round(max(0.0, total - self._cpu_base), 9),
            memory_peak_bytes=_number(f"{self._memory}/memory.max_usage_in_bytes")
            if self._memory is not None else None,
            processes_peak=_number(self._pids_peak) if self._pids_peak is not None else None,
            source="cgroup")
        return self._last_usage

    def configure(self, resources: Resources) -> None:
        """Write the limits that differ from ``limits`` (None: back to unlimited)."""
        old, cpu, memory = self.limits, self.dirs.get("cpu"), self.dirs.get("memory")
        if resources.cpus != old.cpus and cpu is not None:
            if resources.cpus is None:
                _write(cpu / "cpu.cfs_quota_us", "-1")
            else:
                _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                quota = max(1000, round(resources.cpus * CPU_PERIOD_US))
                _write(cpu / "cpu.cfs_quota_us", str(quota))
        if resources.memory != old.memory and memory is not None:
            value = str(resources.memory) if resources.memory is not None else "-1"
            limits = [memory / "memory.limit_in_bytes"]
            memsw = memory / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # the limit is RAM + swap, not RAM alone
                # RAM + swap may never be below RAM: raised first, lowered last.
                raising = resources.memory is None or (
                    old.memory is not None and resources.memory > old.memory)
                limits = [memsw, *limits] if raising else [*limits, memsw]
            for path in limits:
                _write(path, value)
        if resources.pids != old.pids and "pids" in self.dirs:
            _write(self.dirs["pids"] / "pids.max",
                   str(resources.pids) if resources.pids is not None else "max")
        self.limits = resources

    def recyclable(self, max_charge: int) -> bool:
        """True if the next task would see what a new cgroup shows it: no OOM kill, at
        most one process ever (``pids.peak`` cannot be reset), and at most
        ``max_charge`` bytes still charged (the page cache and kernel memory of earlier
        tasks, which count in the next one's peak and against its limit)."""
        oom = self._last_oom if self._last_oom is not None else self.oom_kills()
        peak = self._last_usage.processes_peak if self._last_usage is not None else (
            _number(self._pids_peak) if self._pids_peak is not None else None)
        if oom or (peak is not None and peak > 1):
            return False
        if self._memory is None:
            return True
        peak = self._last_usage.memory_peak_bytes if self._last_usage is not None else None
        if peak is not None and peak <= max_charge:
            return True  # what is charged now was at most the peak: no read needed
        charged = _number(f"{self._memory}/memory.usage_in_bytes")
        return charged is not None and charged <= max_charge

    def recycle(self) -> None:
        """Reset the counters for the next task (the cgroup is empty)."""
        if self._memory is not None:  # the peak restarts from what is charged now
            _write(f"{self._memory}/memory.max_usage_in_bytes", "0")
        total = self._cpu_total if self._cpu_total is not None else self._cpu_seconds()
        self._cpu_base = total or 0.0
        self._cpu_total = self._last_usage = self._last_oom = None

    def remove(self) -> None:
        failure: OSError | None = None
        paths = [*self.dirs.values(), *([self.unified] if self.unified else [])]
        for path in dict.fromkeys(paths):
            try:
                self._rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as error:
                failure = error
        if failure is not None:
            raise failure


# A cgroup goes back to the pool with at most this much still charged to it.
RECYCLE_MAX_CHARGE = 2 * 1024 * 1024
POOL_SIZE = 64


class V1Provider:
    """Task cgroups as ``<base>/<name>`` in each v1 hierarchy (and the unified one).

    An emptied cgroup whose accounting can be reset is kept for the next task instead
    of removed (:meth:`release`): a mkdir and an rmdir per hierarchy per task were the
    largest cgroup cost."""

    mode = "v1"

    def __init__(self, bases: Mapping[str, Path], unified: Path | None, kill: Kill = os.kill,
                 rmdir: Callable[[Path], None] = os.rmdir, pool_size: int = POOL_SIZE) -> None:
        self.bases = dict(bases)
        self.unified = unified
        self._kill = kill
        self._rmdir = rmdir
        self.pool_size = pool_size
        self.idle: list[V1Cgroup] = []
        self.made = 0
        self.reused = 0
        # Each hierarchy costs every task a mkdir, a cgroup.procs write (a migration) and
        # an rmdir. The unified cgroup's cgroup.kill replaces the freezer and its cpu.stat
        # the cpuacct counter, so where it has them a task joins neither.
        redundant = set()
        if unified is not None and (unified / "cgroup.kill").exists():
            redundant.add("freezer")
        if unified is not None and (unified / "cpu.stat").exists():
            redundant.add("cpuacct")
        self.per_task = {name: base for name, base in self.bases.items()
                         if name not in redundant}

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for cgroup in idle:
            try:
                cgroup.remove()
            except OSError:
                pass  # left for the next start's leftovers
        _remove_empty([*self.bases.values(), *([self.unified] if self.unified else [])])

    def leftovers(self) -> list[TaskCgroup]:
        names: set[str] = set()
        for base in [*self.bases.values(), *([self.unified] if self.unified else [])]:
            names.update(path.name for path in _children(base))
        found: list[TaskCgroup] = []
        for name in sorted(names):
            dirs = {controller: base / name for controller, base in self.bases.items()
                    if (base / name).is_dir()}
            unified = self.unified / name if self.unified is not None \
                and (self.unified / name).is_dir() else None
            cgroup = V1Cgroup(dirs, unified, self._kill, self._rmdir)
            _kill_quietly(cgroup)
            found.append(cgroup)
        return found

    def describe(self) -> dict[str, Any]:
        return {"mode": "v1", "root": {name: str(path) for name, path in self.bases.items()},
                "controllers": sorted(self.bases),
                "kill": "cgroup.kill" if self.unified is not None else
                        "freezer" if "freezer" in self.bases else "signal",
                "made": self.made, "reused": self.reused, "idle": len(self.idle)}

    def create(self, name: str, resources: Resources) -> V1Cgroup:
        while self.idle:
            cgroup = self.idle.pop()
            try:
                cgroup.configure(resources)
            except OSError:  # e.g. a lower memory limit than what is charged: a new one
                _remove_quietly(cgroup)
                continue
            self.reused += 1
            return cgroup
        made: dict[str, Path] = {}
        unified = None
        try:
            for controller, base in self.per_task.items():
                if base / name not in made.values():  # co-mounted cpu,cpuacct: one dir
                    os.mkdir(base / name)
                made[controller] = base / name
            if self.unified is not None:
                unified = self.unified / name
                os.mkdir(unified)
            cgroup = V1Cgroup(made, unified, self._kill, self._rmdir)
            cgroup.configure(resources)
        except OSError:
            _remove_quietly(V1Cgroup(made, unified, self._kill, self._rmdir))
            raise
        self.made += 1
        return cgroup

    def release(self, cgroup: TaskCgroup, empty: bool) -> None:
        """Keep an ``empty`` cgroup for the next task when nothing of this one's
        accounting would show in it; otherwise remove it (raises OSError)."""
        if empty and isinstance(cgroup, V1Cgroup) and len(self.idle) < self.pool_size \
                and cgroup.recyclable(RECYCLE_MAX_CHARGE):
            try:
                cgroup.recycle()
            except OSError:
                pass
            else:
                self.idle.append(cgroup)
                return
        cgroup.remove()


def _remove_quietly(cgroup: TaskCgroup) -> None:
    try:
        cgroup.remove()
    except OSError:
        pass


class OffProvider:
    """No cgroups: tasks are tracked by their process group only."""

    mode = "off"

    def __init__(self, why: str = "cgroups = off") -> None:
        self.why = why

    def close(self) -> None:
        pass

    def release(self, cgroup: TaskCgroup, empty: bool) -> None:
        cgroup.remove()

    def leftovers(self) -> list[TaskCgroup]:
        return []

    def describe(self) -> dict[str, Any]:
        return {"mode": "off", "kill": "process group", "why": self.why}

    def create(self, name: str, resources: Resources) -> None:
        return None


def describe_isolation(provider: CgroupProvider) -> str:
    """One line for the log: the mode, the kill method, and where (or why not)."""
    info = provider.describe()
    if info["mode"] == "off":
        return f"process groups only (cgroups off: {info['why']})"
    roots = info["root"]
    where = roots if isinstance(roots, str) else ", ".join(sorted(set(roots.values())))
    return (f"cgroups {info['mode']} ({', '.join(info['controllers'])}; kill by "
            f"{info['kill']}) under {where}")


# -- detection ------------------------------------------------------------------


@attrs.frozen
class Mount:
    """One cgroup mount from ``/proc/self/mountinfo``."""

    root: str  # the hierarchy path mounted here
    point: Path
    version: int
    controllers: tuple[str, ...]


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields, sep, tail = line.partition(" - ")
        parts, rest = fields.split(), tail.split()
        if not sep or len(parts) < 5 or len(rest) < 3:
            continue
        point = Path(parts[4].replace("\\040", " "))
        if rest[0] == "cgroup2":
            mounts.append(Mount(parts[3], point, 2, ()))
        elif rest[0] == "cgroup":
            names = tuple(option for option in rest[2].split(",")
                          if option in V1_CONTROLLERS)
            mounts.append(Mount(parts[3], point, 1, names))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``{"memory": "/a/b", ..., "": "/unified/path"}`` from ``/proc/<pid>/cgroup``."""
    paths = {}
    for line in text.splitlines():
        _, _, rest = line.partition(":")
        names, sep, path = rest.partition(":")
        if not sep:
            continue
        for name in names.split(",") if names else [""]:
            paths[name] = path
    return paths


def _inside(mount: Mount, path: str) -> Path:
    """The directory of hierarchy path ``path`` under ``mount``."""
    root = mount.root.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    return mount.point / path.lstrip("/")


def _writable_dir(path: Path) -> bool:
    """True if a child cgroup can be made here (probe, since root passes os.access)."""
    probe = path / f"oxide-probe-{os.getpid()}"
    try:
        os.mkdir(probe)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        os.rmdir(probe)
    except OSError:
        return False
    return True


def detect(setting: str, node_id: str, *, cgroup_root: str | None = None,
           mountinfo: str | None = None, proc_cgroup: str | None = None) -> CgroupProvider:
    """The provider for ``setting`` (auto, v2, v1, off) on this host.

    A forced mode the host cannot give raises :class:`CgroupUnavailable` with the reason;
    ``auto`` falls back v2 → v1 → off and says why in ``describe()``.
    """
    if setting == "off":
        return OffProvider()
    if mountinfo is None:
        mountinfo = _read(Path("/proc/self/mountinfo")) or ""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    mounts = parse_mountinfo(mountinfo)
    own = parse_proc_cgroup(proc_cgroup)
    reasons = []
    if setting in ("auto", "v2"):
        try:
            return _detect_v2(mounts, own, node_id, cgroup_root, strict=setting == "v2")
        except CgroupUnavailable as error:
            if setting == "v2":
                raise
            reasons.append(str(error))
    if setting in ("auto", "v1"):
        try:
            return _detect_v1(mounts, own, node_id)
        except CgroupUnavailable as error:
            if setting == "v1":
                raise
            reasons.append(str(error))
    return OffProvider("; ".join(reasons))


def _detect_v2(mounts: list[Mount], own: Mapping[str, str], node_id: str,
               cgroup_root: str | None, strict: bool) -> V2Provider:
    if cgroup_root:
        path = Path(cgroup_root)
    else:
        unified = next((mount for mount in mounts if mount.version == 2), None)
        if unified is None or "" not in own:
            raise CgroupUnavailable("v2: no cgroup2 hierarchy is mounted")
        path = _inside(unified, own[""])
    available = (_read(path / "cgroup.controllers") or "").split()
    missing = [name for name in V2_CONTROLLERS if name not in available]
    if missing and not strict:
        raise CgroupUnavailable(f"v2: {path} lacks the {', '.join(missing)} controller(s)")
    if not _writable_dir(path):
        raise CgroupUnavailable(f"v2: {path} is not writable (not delegated to this agent)")
    try:
        return V2Provider.delegate(path, node_id)
    except OSError as error:
        raise CgroupUnavailable(f"v2: cannot take over {path}: {error}") from None


def _detect_v1(mounts: list[Mount], own: Mapping[str, str], node_id: str) -> V1Provider:
    bases: dict[str, Path] = {}
    for controller in V1_CONTROLLERS:
        mount = next((m for m in mounts if m.version == 1 and controller in m.controllers),
                     None)
        if mount is None:
            continue
        path = _inside(mount, own.get(controller, "/"))
        base = path / f"oxide-{node_id}"
        try:
            base.mkdir(exist_ok=True)
        except OSError:
            continue
        bases[controller] = base
    missing = [name for name in V1_REQUIRED if name not in bases]
    if missing:
        raise CgroupUnavailable(f"v1: no writable {', '.join(missing)} hierarchy")
    unified_base = None
    unified = next((mount for mount in mounts if mount.version == 2), None)
    if unified is not None and "" in own:
        candidate = _inside(unified, own[""])
        if _writable_dir(candidate):
            unified_base = candidate / f"oxide-{node_id}"
            unified_base.mkdir(exist_ok=True)
    return V1Provider(bases, unified_base)

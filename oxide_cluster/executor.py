"""Running tasks: one :class:`TaskRun` owns one task's process, the Executor schedules them.

Each task runs in its own session and process group, so a cancel or a timeout reaches
every process the command started (``sh -c 'sleep 300 & sleep 300'`` included). When the
main process exits, whatever it left behind in its group is killed: a task ends when its
command ends, and no orphan keeps the pipes (and the slot) open. Where the host allows,
each task also has its own cgroup (``oxide_cluster.cgroups``): limits, usage, and a kill
that reaches processes which left the group (``setsid``, double fork).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

from twisted.application import service
from twisted.internet import defer, error, main, process, protocol
from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from oxide_cluster.capacity import Allocatable, Capacity, describe, misfit, taken
from oxide_cluster.cgroups import (
    CgroupProvider,
    OffProvider,
    Resources,
    TaskCgroup,
    format_size,
)
from oxide_cluster.clock import SecondsClock
from oxide_cluster.interfaces import ITaskRunner
from oxide_cluster.model import Task, TaskRequest, TaskState, new_task_id
from oxide_cluster.protection import TASK_OOM_SCORE_ADJ, User, set_oom_score_adj
from oxide_cluster.sampling import INTERVAL as SAMPLE_INTERVAL
from oxide_cluster.sampling import REAPED, TreeSampler
from oxide_cluster.waiters import Waiters

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# After SIGKILL a process can still hang in the kernel (D state); after this long we
# stop waiting and record the task as ended so its slot is not held forever.
KILL_GIVE_UP = 5.0
# While the last processes of a task's cgroup die after the kill, look this often.
CGROUP_POLL = 0.01
# Output bytes queued for SQLite before task pipes stop being read, and where reading
# resumes: agent memory stays bounded however fast tasks write.
OUTPUT_BACKLOG_HIGH = 8 * 1024 * 1024
OUTPUT_BACKLOG_LOW = 2 * 1024 * 1024

OutputListener = Callable[[Task, int, str, bytes], None]
StateListener = Callable[[Task], None]


class WorkspaceHook(Protocol):
    """Builds a task's directory before it runs and collects its artifacts after
    (``oxide_cluster.workspace.Workspaces``)."""

    def prepare(self, task: Task) -> defer.Deferred[str]:
        """Fires with the directory to run in, or fails with the reason."""

    def finish(self, task: Task) -> defer.Deferred[None]:
        """Fires once artifacts are kept and the directory is gone (or kept)."""


def base_environment(task: Task) -> dict[str, str]:
    """The documented minimal environment a task starts from (no agent secrets)."""
    env = {
        "PATH": os.environ.get("PATH", BASE_PATH),
        "HOME": os.environ.get("HOME", "/"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "OXIDE_TASK_ID": task.id,
        "OXIDE_NODE_ID": task.node_id,
    }
    for name in ("USER", "LOGNAME", "TMPDIR", "TZ"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class _LargeReadProcessReader(process.ProcessReader):
    """Reads up to 64 KiB per wakeup (Twisted reads 8 KiB): a fast writer then costs one
    store row, one WebSocket frame and one trip through the listeners per 64 KiB."""

    READ_SIZE = 64 * 1024

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, self.READ_SIZE)
        except InterruptedError:
            return None
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.dataReceived(data)
        return None


# Every signal back to its default in the child, as after a fork and exec with nothing
# ignored: the same result as listing the agent's ignored signals (SIGPIPE, ...), without
# asking for all 64 dispositions on every spawn.
_CATCHABLE_SIGNALS = tuple(sorted(number for number in signal.valid_signals()
                                  if number not in (signal.SIGKILL, signal.SIGSTOP)))


def _enter_cgroups(files: tuple[str, ...]) -> None:
    """In the forked child, before exec: raise its OOM score above the agent's, and join
    the task's cgroup(s) so that nothing the command starts can be outside them. An
    error ends the child (its traceback goes to the task's stderr): a task must not run
    unconfined."""
    set_oom_score_adj(TASK_OOM_SCORE_ADJ)
    pid = str(os.getpid()).encode()
    for name in files:
        fd = os.open(name, os.O_WRONLY)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)


class _SignalSafeFork:
    """The agent's Python signal handlers must never run in a forked child before exec:
    a cancel's SIGTERM landing there ran Twisted's waker on a closed descriptor and the
    task ended with exit code 1 and a traceback as output. Signals are blocked across
    the fork; the child sets every handled signal back to its default, then unblocks, so
    a signal that came meanwhile acts as it would on the command itself.

    ``posix_spawn`` runs no Python in the child (it gets default dispositions and the
    agent's mask from the kernel), so it is tried first with the mask only read; the
    signals are blocked only when the agent really forks."""

    _mask_before_fork: set[int | signal.Signals] = set()
    _spawn_tried = False

    def _fork(self, path: Any, uid: Any, gid: Any, executable: str, args: list[str],
              environment: dict[str, str], **kwargs: Any) -> None:
        # Blocking nothing reads the mask; restoring a full one would return ~62 signals
        # converted to enums on every spawn.
        self._mask_before_fork = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        if self._trySpawnInsteadOfFork(  # type: ignore[attr-defined]
                path, uid, gid, executable, args, environment, kwargs):
            return
        self._spawn_tried = True  # Twisted's _fork asks again: the answer stays no
        signal.pthread_sigmask(signal.SIG_BLOCK, _CATCHABLE_SIGNALS)
        try:
            super()._fork(path, uid, gid, executable, args, environment,  # type: ignore[misc]
                          **kwargs)
        finally:  # only the parent gets here: the child execs or exits inside
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask_before_fork)

    def _default_signals_in_child(self) -> None:
        for number in _CATCHABLE_SIGNALS:
            if callable(signal.getsignal(number)):
                signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask_before_fork)


# The cgroup path without a fork of the agent: posix_spawn (no copy of the agent's page
# tables, no Python in the child) runs this small sh, which writes its own pid into each
# cgroup.procs, changes directory, then execs the command, so the command and all it
# starts are inside from their first instruction. An error exits 127 before the exec: a
# task never runs unconfined. ``exec "$@"`` keeps the task's argv[0]; sh looks the name
# up in the same PATH the agent resolved it in (relative PATH entries take the fork path).
_ENTER_SCRIPT = (
    f'echo {TASK_OOM_SCORE_ADJ} > /proc/self/oom_score_adj 2>/dev/null\n'
    'n=$1; d=$2; shift 2\n'
    'while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 127; shift; n=$((n - 1)); done\n'
    '[ -z "$d" ] || cd -- "$d" || exit 127\n'
    'exec "$@"\n')
_SHELL = "/bin/sh"


def _spawn_via_shell(args: list[str], path: str | None, environment: Mapping[str, str],
                     cgroup_procs: tuple[str, ...]) -> list[str] | None:
    """argv for ``_ENTER_SCRIPT`` that enters ``cgroup_procs`` and runs ``args`` in
    ``path``; None where sh could resolve or run it differently (take the fork path)."""
    if not os.path.exists(_SHELL) or (path is not None and not os.path.isabs(path)):
        return None
    if os.sep not in args[0] and not all(
            os.path.isabs(entry) for entry in environment.get("PATH", "").split(os.pathsep)):
        return None
    return ["sh", "-c", _ENTER_SCRIPT, "oxide-enter", str(len(cgroup_procs)), path or "",
            *cgroup_procs, *args]


_dev_null_fd: int | None = None


def _dev_null() -> int:
    """A descriptor of /dev/null, opened once, that every task gets as its stdin: no pipe,
    writer or epoll registration per task just to close it at once (a read sees EOF
    as before)."""
    global _dev_null_fd
    if _dev_null_fd is None:
        _dev_null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _dev_null_fd


class _GroupLeaderProcess(_SignalSafeFork, process.Process):
    """A child process that starts its own session, so its group can be signalled whole.

    The fast path is ``posix_spawnp(..., setsid=True)`` of ``_ENTER_SCRIPT``, a small sh
    that raises the task's OOM score, joins its cgroups (if any), changes directory and
    execs the command; it needs Twisted's private fd helpers. The fork path (a fork of
    the whole agent, Python in the child, which calls ``setsid()`` and does the same
    before exec) is left for what sh cannot do the same way, for ``run_as`` and for a
    Twisted without those helpers.
    """

    processReaderFactory = _LargeReadProcessReader

    def __init__(self, reactor: Any, executable: str, args: list[str],
                 environment: dict[str, str], path: str | None,
                 proto: protocol.ProcessProtocol, cgroup_procs: tuple[str, ...] = (),
                 user: User | None = None) -> None:
        self.cgroup_procs = cgroup_procs  # read by the child, so set before the fork
        super().__init__(reactor, executable, args, environment, path, proto,
                         uid=user.uid if user else None, gid=user.gid if user else None,
                         childFDs={0: _dev_null(), 1: "r", 2: "r"})

    def _trySpawnInsteadOfFork(self, path: Any, uid: Any, gid: Any, executable: str,
                               args: list[str], environment: dict[str, str],
                               kwargs: dict[str, Any]) -> bool:
        helpers: list[Any] = [getattr(process, name, None) for name in
                   ("_listOpenFDs", "_getFileActions", "_PS_CLOSE", "_PS_DUP2")]
        if self._spawn_tried or uid is not None or gid is not None or None in helpers:
            return False
        # Always through the small sh: it raises the OOM score (and joins the cgroups)
        # before the command runs, so nothing the command forks keeps the agent's score.
        wrapped = _spawn_via_shell(args, path, environment, self.cgroup_procs)
        if wrapped is None:
            return False
        executable, args = _SHELL, wrapped
        list_open_fds, file_actions, ps_close, ps_dup2 = helpers
        fd_state = []
        for fd in list_open_fds():
            try:
                fd_state.append((fd, fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC))
            except OSError:
                pass
        self.pid = os.posix_spawnp(
            executable, args, environment,
            file_actions=file_actions(fd_state, kwargs.get("fdmap"), doClose=ps_close,
                                      doDup2=ps_dup2),
            setsigdef=_CATCHABLE_SIGNALS, setsigmask=self._mask_before_fork, setsid=True)
        self.status = -1
        return True

    def _setupChild(self, *args: Any, **kwargs: Any) -> None:
        self._default_signals_in_child()
        os.setsid()
        super()._setupChild(*args, **kwargs)
        _enter_cgroups(self.cgroup_procs)


class _TaskProtocol(protocol.ProcessProtocol):
    """Thin: hands every process event to the TaskRun."""

    def __init__(self, run: TaskRun) -> None:
        self._run = run

    def outReceived(self, data: bytes) -> None:
        self._run.output("stdout", data)

    def errReceived(self, data: bytes) -> None:
        self._run.output("stderr", data)

    def processExited(self, reason: Failure) -> None:
        self._run.exited()

    def processEnded(self, reason: Failure) -> None:
        self._run.ended(reason)


class _TerminalProcess(_SignalSafeFork, process.PTYProcess):
    """A child on a new pseudo-terminal: Twisted's ``PTYProcess`` child calls ``setsid()``
    and takes the pty as its controlling terminal, so it leads its own session and
    process group (the group kill works as without a pty). stdout and stderr are one
    stream, the terminal, read as stdout."""

    cgroup_procs: tuple[str, ...] = ()

    def __init__(self, reactor: Any, executable: str, args: list[str],
                 environment: dict[str, str], path: str | None,
                 proto: protocol.ProcessProtocol, cgroup_procs: tuple[str, ...] = (),
                 user: User | None = None) -> None:
        self.cgroup_procs = cgroup_procs  # read by the child, so set before the fork
        super().__init__(reactor, executable, args, environment, path, proto,
                         uid=user.uid if user else None, gid=user.gid if user else None)
        # A pty has no stdin to close; an end-of-file (^D) in the line discipline makes
        # a task that reads the terminal see EOF instead of waiting until its timeout.
        self.write(b"\x04")

    def _setupChild(self, *args: Any, **kwargs: Any) -> None:
        self._default_signals_in_child()
        super()._setupChild(*args, **kwargs)
        _enter_cgroups(self.cgroup_procs)


def spawn_in_new_group(reactor: IReactorProcess, proto: protocol.ProcessProtocol,
                       executable: str, args: list[str], env: dict[str, str],
                       path: str | None, tty: bool = False,
                       cgroup_procs: tuple[str, ...] = (), user: User | None = None) -> Any:
    """Start a task's process in its own session; with ``tty``, on a new pseudo-terminal.
    With ``cgroup_procs``, the child writes its pid into each before it execs; with
    ``user``, it runs as that user."""
    if tty:
        return _TerminalProcess(reactor, executable, args, env, path, proto, cgroup_procs,
                                user)
    return _GroupLeaderProcess(reactor, executable, args, env, path, proto, cgroup_procs,
                               user)


@implementer(ITaskRunner)
class ProcessRunner:
    """The ``process`` runner: each task leads its own process group, isolated and limited
    by ``cgroups`` (the ``cgroups`` key: auto, v2, v1 or off)."""

    def __init__(self, cgroups: CgroupProvider | None = None,
                 spawn: Callable[..., Any] = spawn_in_new_group,
                 signal_group: Callable[[int, int], None] = os.killpg,
                 run_as: User | None = None) -> None:
        self.cgroups: CgroupProvider = cgroups or OffProvider()
        self._spawn = spawn
        self._signal_group = signal_group
        self.run_as = run_as

    def spawn(self, reactor: Any, proto: Any, executable: str, args: list[str],
              env: dict[str, str], path: str | None, tty: bool = False,
              cgroup_procs: tuple[str, ...] = ()) -> Any:
        if self.run_as is not None:
            return self._spawn(reactor, proto, executable, args, env, path, tty=tty,
                               cgroup_procs=cgroup_procs, user=self.run_as)
        return self._spawn(reactor, proto, executable, args, env, path, tty=tty,
                           cgroup_procs=cgroup_procs)

    def signal(self, pid: int, signum: int) -> None:
        self._signal_group(pid, signum)


class CommandPaths:
    """``shutil.which`` answers by (command, PATH), each kept ``ttl`` seconds: a run of
    tasks does not search PATH each time, and a command installed earlier in PATH is
    seen within ``ttl``. A kept path is checked (one ``access``) before each use, so a
    removed command is searched for again at once, never started from its old place."""

    def __init__(self, clock: SecondsClock, ttl: float = 1.0, size: int = 256) -> None:
        self._clock = clock
        self._ttl = ttl
        self._size = size
        self._found: dict[tuple[str, str | None], tuple[str, float]] = {}

    def which(self, command: str, path: str | None) -> str | None:
        key = (command, path)
        now = self._clock.seconds()
        known = self._found.get(key)
        if known is not None and known[1] > now and os.access(known[0], os.X_OK):
            return known[0]
        found = shutil.which(command, path=path)
        if found is None:
            self._found.pop(key, None)
            return None
        if len(self._found) >= self._size:
            self._found.clear()
        self._found[key] = (found, now + self._ttl)
        return found

    def forget(self, command: str, path: str | None) -> None:
        self._found.pop((command, path), None)


class TaskRun:
    """One task's process: spawn, output with offsets, timeouts, the kill sequence, result."""

    log = Logger()

    def __init__(self, reactor: Any, task: Task, secret_env: dict[str, str], *,
                 kill_grace: float, output_limit: int, on_output: OutputListener,
                 on_finished: Callable[[TaskRun], None],
                 spawn: Callable[..., Any] = spawn_in_new_group,
                 signal_group: Callable[[int, int], None] = os.killpg,
                 cgroups: CgroupProvider | None = None, sample_usage: bool = False,
                 paths: CommandPaths | None = None) -> None:
        self._reactor = reactor
        self._paths = paths or CommandPaths(reactor, ttl=0)
        self.task = task
        self._sample_usage = sample_usage
        self._sampler: TreeSampler | None = None
        self._sampling: LoopingCall | None = None
        self._reaped_cpu = 0.0
        self._cgroups: CgroupProvider = cgroups or OffProvider()
        self.cgroup: TaskCgroup | None = None
        # Seen empty once: it stays empty (only a member can add a process to it), so
        # neither the kill at exit, the settle nor the release reads it again.
        self._cgroup_empty = False
        self._kill_group = signal_group
        self._secret_env = secret_env
        self._kill_grace = kill_grace
        self._output_limit = output_limit
        self._on_output = on_output
        self._on_finished = on_finished
        self._spawn = spawn
        self._offset = 0
        self._stop: tuple[TaskState, str] | None = None
        self._timers: dict[str, DelayedCall] = {}
        self._pgid: int | None = None
        self._process: Any = None
        self._done = False

    # -- start ------------------------------------------------------------------

    def start(self, directory: str | None = None) -> None:
        """Spawn the process, or end the task ``failed`` with a reason a human can act on.

        ``directory`` (a built workspace) replaces the task's own ``cwd``."""
        task = self.task
        env = base_environment(task)
        env.update(task.env)
        env.update(self._secret_env)
        cwd = directory or task.cwd
        if cwd is not None and not os.path.isdir(cwd):
            where = f"{task.cwd} (in the workspace)" if directory else cwd
            self._finish(TaskState.FAILED, f"cwd does not exist: {where}")
            return
        executable = self._paths.which(task.command, env.get("PATH"))
        if executable is None and os.sep in task.command:
            executable = None if not os.path.exists(task.command) else task.command
        if executable is None:
            self._finish(TaskState.FAILED, f"command not found: {task.command}")
            return
        try:
            self.cgroup = self._cgroups.create(task.id, Resources.from_json(task.resources))
        except OSError as failure:
            self._finish(TaskState.FAILED, f"cannot create the task's cgroup: {failure}")
            return
        extra = {"cgroup_procs": self.cgroup.procs_files} if self.cgroup is not None else {}
        try:
            proc = self._spawn(self._reactor, _TaskProtocol(self), executable,
                               [task.command, *task.args], env, cwd, tty=task.tty, **extra)
        except OSError as failure:
            self._paths.forget(task.command, env.get("PATH"))
            self._finish(TaskState.FAILED, f"cannot start {task.command}: {failure.strerror}")
            return
        except Exception as failure:
            # Anything else (text argv/environ cannot encode, ...) must still end the task:
            # a run left half-started would hold its slot forever.
            self._finish(TaskState.FAILED, f"cannot start {task.command}: {failure}")
            return
        self._process = proc
        self._pgid = proc.pid
        task.pid = proc.pid
        if self.cgroup is None and self._sample_usage and isinstance(proc.pid, int):
            self._sampler = TreeSampler(proc.pid)
            self._sampling = LoopingCall(self._sampler.sample)
            self._sampling.clock = self._reactor
            # The first sample after one interval: a short task costs no /proc scan.
            self._sampling.start(SAMPLE_INTERVAL, now=False).addErrback(
                lambda failure: self.log.failure("usage sampling failed", failure))
        task.state = TaskState.RUNNING
        task.started_at = self._reactor.seconds()
        self._timers["timeout"] = self._reactor.callLater(task.timeout, self._timed_out)
        self._arm_idle_timer()

    def pause_output(self) -> None:
        """Stop reading the task's pipes (the store is behind); the process blocks on write."""
        if self._process is not None and hasattr(self._process, "pauseProducing"):
            self._process.pauseProducing()

    def resume_output(self) -> None:
        if self._process is not None and hasattr(self._process, "resumeProducing"):
            self._process.resumeProducing()

    def _arm_idle_timer(self) -> None:
        if self.task.idle_timeout is None or self._stop is not None:
            return
        timer = self._timers.get("idle")
        if timer is not None and timer.active():
            timer.reset(self.task.idle_timeout)
        else:
            self._timers["idle"] = self._reactor.callLater(self.task.idle_timeout,
                                                           self._idle_timed_out)

    # -- events from the process ------------------------------------------------

    def output(self, stream: str, data: bytes) -> None:
        self._arm_idle_timer()
        room = self._output_limit - self._offset
        if room <= 0:
            self.task.output_dropped += len(data)
            return
        if len(data) > room:
            self.task.output_dropped += len(data) - room
            data = data[:room]
        offset = self._offset
        self._offset += len(data)
        self.task.output_bytes = self._offset
        self._on_output(self.task, offset, stream, data)

    def exited(self) -> None:
        """The main process is gone: kill what it left in its group (and cgroup) so the
        pipes close and nothing of the task outlives it."""
        self._reaped_cpu = REAPED.take()
        self._stop_sampling()
        self._signal_group(signal.SIGKILL)
        self._kill_cgroup(if_populated=True)

    def ended(self, reason: Failure) -> None:
        status = reason.value
        exit_code = getattr(status, "exitCode", None)
        signal_number = getattr(status, "signal", None)
        self.task.exit_code = exit_code
        self.task.signal = signal_number
        if self._stop is not None:
            state, why = self._stop
        elif isinstance(status, error.ProcessDone) or exit_code == 0:
            state, why = TaskState.SUCCEEDED, "exited with code 0"
        elif signal_number is not None:
            state, why = TaskState.FAILED, f"killed by {signal_name(signal_number)}"
        else:
            state, why = TaskState.FAILED, f"exited with code {exit_code}"
        if self.cgroup is None:
            if self._sampler is not None:
                self.task.usage = self._sampler.usage(self._reaped_cpu).to_json()
            self._finish(state, why)
            return
        self._kill_cgroup(if_populated=True)
        self._settle(state, why, self._reactor.seconds() + KILL_GIVE_UP)

    def _settle(self, state: TaskState, why: str, deadline: float) -> None:
        """Wait until the cgroup is empty, then read its accounting, remove it, finish."""
        cgroup = self.cgroup
        assert cgroup is not None
        try:
            populated = not self._cgroup_empty and cgroup.populated()
        except OSError:
            populated = False  # unreadable: not known empty, the release looks again
        else:
            self._cgroup_empty = not populated
        if populated and self._reactor.seconds() < deadline:
            self._timers["settle"] = self._reactor.callLater(
                CGROUP_POLL, self._settle, state, why, deadline)
            return
        if populated:
            self.log.warn("task {task_id}: processes left in its cgroup {seconds}s after "
                          "SIGKILL", task_id=self.task.id, seconds=KILL_GIVE_UP)
        try:
            self.task.usage = cgroup.usage().to_json()
            oom_kills = cgroup.oom_kills()
        except OSError as failure:
            self.log.warn("cannot read the cgroup of task {task_id}: {error}",
                          task_id=self.task.id, error=failure)
            oom_kills = 0
        if oom_kills:
            self.task.oom_killed = True
            if state not in (TaskState.CANCELLED, TaskState.TIMED_OUT):
                memory = (self.task.resources or {}).get("memory")
                limit = f"its memory limit ({format_size(memory)})" if memory else \
                    "the memory limit of its cgroup"
                state, why = TaskState.FAILED, f"out of memory: the kernel's OOM killer " \
                    f"ended {oom_kills} process(es) at {limit}; the command {why}"
        self._finish(state, why)

    # -- stopping ---------------------------------------------------------------

    def stop(self, state: TaskState, reason: str) -> bool:
        """Begin the kill sequence (TERM, grace, KILL); False if already ending."""
        if self._done or self._stop is not None:
            return False
        if self._process is None:  # not started yet (its workspace is being built)
            self._finish(state, reason)
            return True
        self._stop = (state, reason)
        self._cancel_timer("idle")
        self._cancel_timer("timeout")
        self._signal_group(signal.SIGTERM)
        if self.cgroup is not None:  # also the ones that left the group (setsid)
            try:
                self.cgroup.signal_all(signal.SIGTERM)
            except OSError as failure:
                self.log.warn("cannot signal the cgroup of task {task_id}: {error}",
                              task_id=self.task.id, error=failure)
        self._timers["kill"] = self._reactor.callLater(self._kill_grace, self._kill)
        return True

    def _timed_out(self) -> None:
        self.stop(TaskState.TIMED_OUT, f"timed out after {self.task.timeout:g}s")

    def _idle_timed_out(self) -> None:
        self.stop(TaskState.TIMED_OUT,
                  f"no output for {self.task.idle_timeout:g}s (idle timeout)")

    def _kill(self) -> None:
        self._signal_group(signal.SIGKILL)
        self._kill_cgroup()
        self._timers["give_up"] = self._reactor.callLater(KILL_GIVE_UP, self._give_up)

    def _give_up(self) -> None:
        assert self._stop is not None
        state, reason = self._stop
        self.log.warn("task {task_id} did not end {seconds}s after SIGKILL",
                      task_id=self.task.id, seconds=KILL_GIVE_UP)
        self._finish(state, f"{reason}; process did not exit after SIGKILL")

    def _signal_group(self, number: int) -> None:
        if self._pgid is None:
            return
        try:
            self._kill_group(self._pgid, number)
        except ProcessLookupError:
            pass
        except PermissionError as failure:
            self.log.warn("cannot signal task {task_id}: {error}", task_id=self.task.id,
                          error=failure)

    def _kill_cgroup(self, if_populated: bool = False) -> None:
        """SIGKILL the cgroup. ``if_populated``: first look whether anything is left (a
        read costs far less than a kill, and an empty cgroup stays empty: only a member
        can add a process to it)."""
        if self.cgroup is None or self._cgroup_empty:
            return
        try:
            if if_populated and not self.cgroup.populated():
                self._cgroup_empty = True
                return
            self.cgroup.kill()
        except OSError as failure:
            self.log.warn("cannot kill the cgroup of task {task_id}: {error}",
                          task_id=self.task.id, error=failure)

    def _release_cgroup(self) -> None:
        """Hand the task's cgroup back to the provider (removed, or kept empty for a later
        task); what is still in it (a stuck process) is logged."""
        cgroup, self.cgroup = self.cgroup, None
        if cgroup is None:
            return
        try:
            empty = self._cgroup_empty or not cgroup.populated()
            if not empty:
                cgroup.kill()
            self._cgroups.release(cgroup, empty)
        except OSError as failure:
            self.log.warn("cannot remove the cgroup of task {task_id}: {error}",
                          task_id=self.task.id, error=failure)

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    @property
    def done(self) -> bool:
        return self._done

    def fail_to_start(self, reason: str) -> None:
        """End a task that never started (its workspace could not be made)."""
        self._finish(TaskState.FAILED, reason)

    def _finish(self, state: TaskState, reason: str) -> None:
        if self._done:
            return
        self._done = True
        self._stop_sampling()
        for name in list(self._timers):
            self._cancel_timer(name)
        self._release_cgroup()
        task = self.task
        task.state = state
        task.reason = reason
        task.finished_at = self._reactor.seconds()
        if self.task.output_dropped:
            task.reason += f"; {task.output_dropped} bytes of output over the limit dropped"
        self._on_finished(self)


    def _stop_sampling(self) -> None:
        if self._sampling is not None and self._sampling.running:
            self._sampling.stop()


def _populated(cgroup: TaskCgroup) -> bool:
    try:
        return cgroup.populated()
    except OSError:
        return False


class CapacityError(Exception):
    """The node cannot take a task now; ``status`` is 429 (slots) or 503 (host load)."""

    def __init__(self, status: int, code: str, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class Executor(service.Service):
    """Admits tasks against the node's capacity, runs them, and records every change."""

    log = Logger()

    def __init__(self, reactor: Any, store: Any, node_id: str, *, max_tasks: int,
                 kill_grace: float, output_limit: int, default_timeout: float,
                 load: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0),
                 max_cpu_percent: float = 100.0, max_memory_percent: float = 100.0,
                 spawn: Callable[..., Any] = spawn_in_new_group,
                 signal_group: Callable[[int, int], None] = os.killpg,
                 workspaces: WorkspaceHook | None = None,
                 cgroups: CgroupProvider | None = None,
                 default_resources: Resources = Resources(),
                 allocatable: Allocatable | None = None,
                 sample_usage: bool = False) -> None:
        self._reactor = reactor
        self._sample_usage = sample_usage  # where no cgroup counts (tap: on)
        self.allocatable = allocatable
        self.cgroups: CgroupProvider = cgroups or OffProvider()
        self._default_resources = default_resources
        self._store = store
        self._workspaces = workspaces
        self._signal_group = signal_group
        self.node_id = node_id
        self.max_tasks = max_tasks
        self._kill_grace = kill_grace
        self._output_limit = output_limit
        self._default_timeout = default_timeout
        self._load = load
        self._max_cpu = max_cpu_percent
        self._max_memory = max_memory_percent
        self._spawn = spawn
        self._paths = CommandPaths(reactor)
        self.runs: dict[str, TaskRun] = {}
        self._end_waiters: Waiters[str, Task] = Waiters()
        self._output_waiters: Waiters[str, None] = Waiters()  # marked with the offset
        self._stopping = False
        self.store_failures = 0
        self._store_failed_tasks: set[str] = set()
        self._output_paused = False
        self.ready = False
        self._recording = 0
        self._idle_waiters: Waiters[None, None] = Waiters()
        self.output_listeners: list[OutputListener] = []
        self.state_listeners: list[StateListener] = []
        self.finished_total = 0

    # -- capacity ---------------------------------------------------------------

    @property
    def running_count(self) -> int:
        return len(self.runs)

    @property
    def free_slots(self) -> int:
        return max(0, self.max_tasks - len(self.runs))

    def capacity(self) -> Capacity | None:
        """Allocatable and free declared resources (None: the node does not count them)."""
        if self.allocatable is None:
            return None
        cpus, memory = taken(run.task.resources for run in self.runs.values())
        return Capacity(self.allocatable, self.allocatable.cpus - cpus,
                        self.allocatable.memory - memory)

    def check_capacity(self, resources: Resources | None = None) -> None:
        """Raise CapacityError when a new task would exceed slots, the free declared
        ``resources``, or the CPU or memory limits."""
        if self._stopping:
            raise CapacityError(503, "shutting_down", "the node is shutting down", 5)
        if not self.ready:
            raise CapacityError(503, "starting", "the node is still starting", 1)
        if not self.free_slots:
            raise CapacityError(429, "no_free_slots",
                                f"all {self.max_tasks} task slots are busy", 1)
        capacity = self.capacity()
        if resources is not None and capacity is not None:
            resource = misfit(resources, capacity.free_cpus, capacity.free_memory)
            if resource is not None:
                free = (f"{max(0.0, capacity.free_cpus):g} of {capacity.allocatable.cpus:g} "
                        "allocatable CPUs" if resource == "cpus" else
                        f"{max(0, capacity.free_memory) // 2**20} of "
                        f"{capacity.allocatable.memory // 2**20} MiB allocatable memory")
                raise CapacityError(429, "no_free_resources",
                                    f"the task declares {describe(resource, resources)}; "
                                    f"{free} are free", 1)
        cpu, memory = self._load()
        if cpu > self._max_cpu:
            raise CapacityError(503, "cpu_busy",
                                f"CPU at {cpu:.0f}% is above the {self._max_cpu:g}% limit", 2)
        if memory > self._max_memory:
            raise CapacityError(503, "memory_busy",
                                f"memory at {memory:.0f}% is above the "
                                f"{self._max_memory:g}% limit", 2)

    # -- lifecycle ----------------------------------------------------------------

    async def recover(self) -> list[Task]:
        """Tasks that were unfinished when the previous agent died are ``lost``, not resumed;
        what their processes left in their cgroups is killed and the cgroups removed."""
        await self._remove_leftover_cgroups()
        lost: list[Task] = await self._store.mark_unfinished_lost(
            self.node_id, "the agent stopped while the task was unfinished (agent restart)",
            self._reactor.seconds())
        for task in lost:
            self.log.warn("task {task_id} was {state} when the agent died: marked lost",
                          task_id=task.id, state="unfinished")
        self.ready = True
        return lost

    async def _remove_leftover_cgroups(self) -> None:
        """A killed agent (``kill -9``, OOM, power) leaves its tasks' cgroups and every
        process in them (a setsid escape included): kill them, then remove the cgroups."""
        try:
            leftovers = self.cgroups.leftovers()
        except Exception:
            self.log.failure("cannot look for task cgroups a previous agent left")
            return
        if not leftovers:
            return
        deadline = self._reactor.seconds() + KILL_GIVE_UP
        pending = list(leftovers)
        while pending and self._reactor.seconds() < deadline:
            pending = [cgroup for cgroup in pending if _populated(cgroup)]
            for cgroup in pending:  # a fork between listing and kill (v1, no freezer)
                try:
                    cgroup.kill()
                except OSError:
                    pass
            if pending:
                await deferLater(self._reactor, CGROUP_POLL, lambda: None)
        removed = 0
        for cgroup in leftovers:
            try:
                cgroup.remove()
                removed += 1
            except OSError as error:
                self.log.warn("cannot remove a task cgroup a previous agent left: {error}",
                              error=error)
        self.log.warn("{removed} of {count} task cgroups left by a previous agent killed "
                      "and removed", removed=removed, count=len(leftovers))

    def stopService(self) -> defer.Deferred[None]:
        """Terminate running tasks (recorded ``cancelled``: agent shutdown) and wait."""
        super().stopService()
        self._stopping = True
        for run in list(self.runs.values()):
            run.stop(TaskState.CANCELLED, "agent shutdown")
        return self.when_idle().addCallback(lambda _: self.cgroups.close())

    def when_idle(self) -> defer.Deferred[None]:
        """Fires when no task runs and every finished task has been recorded."""
        if not self.runs and not self._recording:
            return defer.succeed(None)
        return self._idle_waiters.wait(None)

    # -- tasks ------------------------------------------------------------------

    def submit(self, request: TaskRequest, *, task_id: str | None = None, attempt: int = 1,
               retry_of: str | None = None) -> defer.Deferred[Task]:
        """Admit and start a task; fires with the task once its record is committed."""
        task = self.new_task(request, task_id=task_id, attempt=attempt, retry_of=retry_of)
        self.check_capacity(Resources.from_json(task.resources))
        return self.start(task, request.secret_env)

    def new_task(self, request: TaskRequest, *, task_id: str | None = None, attempt: int = 1,
                 retry_of: str | None = None) -> Task:
        """The record of a task of this node, not started (state ``queued``)."""
        now = self._reactor.seconds()
        return Task(
            id=task_id or new_task_id(now, self.node_id),
            node_id=self.node_id,
            command=request.command,
            args=list(request.args),
            cwd=request.cwd,
            env=dict(request.env),
            secret_env_keys=sorted(request.secret_env),
            labels=dict(request.labels),
            timeout=request.timeout or self._default_timeout,
            idle_timeout=request.idle_timeout,
            retries=request.retries,
            tty=request.tty,
            created_at=now,
            attempt=attempt,
            retry_of=retry_of,
            workspace=request.workspace,
            artifacts=list(request.artifacts) or None,
            source=dict(request.source) if request.source else None,
            priority=request.priority,
            group=request.group,
            queue_timeout=request.queue_timeout,
            resources=(request.resources or Resources()).over(
                self._default_resources).to_json() or None,
            fanout=dict(request.fanout) if request.fanout else None,
        )

    def start(self, task: Task, secret_env: Mapping[str, str]) -> defer.Deferred[Task]:
        """Start a task record made by ``new_task`` (capacity is the caller's check)."""
        run = TaskRun(self._reactor, task, dict(secret_env),
                      kill_grace=self._kill_grace, output_limit=self._output_limit,
                      on_output=self._output, on_finished=self._finished, spawn=self._spawn,
                      signal_group=self._signal_group, cgroups=self.cgroups,
                      sample_usage=self._sample_usage, paths=self._paths)
        self.runs[task.id] = run
        if task.workspace is not None or task.source is not None:
            self._start_in_workspace(run)
        else:
            run.start()
        if self._output_paused:
            run.pause_output()
        stored = self._store.put_task(task)
        if task.state is TaskState.RUNNING:
            self._notify_state(task)

        def not_recorded(failure: Failure) -> Failure:
            # A task the store cannot hold would be lost on restart: stop it at once.
            run.stop(TaskState.FAILED, "the store cannot be written; task stopped")
            return failure
        return stored.addCallbacks(lambda _: task, not_recorded)

    def _start_in_workspace(self, run: TaskRun) -> None:
        """The task stays ``queued`` (holding its slot) while its directory is built."""
        if self._workspaces is None:
            run.fail_to_start("this node cannot build workspaces")
            return

        def built(directory: str) -> None:
            if run.done:  # cancelled meanwhile
                return
            run.start(directory)
            if self._output_paused:
                run.pause_output()
            if run.task.state is TaskState.RUNNING:
                self._store.put_task(run.task).addErrback(self._log_store_failure,
                                                          run.task.id)
                self._notify_state(run.task)

        def not_built(failure: Failure) -> None:
            if not run.done:
                run.fail_to_start(failure.getErrorMessage())

        self._workspaces.prepare(run.task).addCallbacks(built, not_built)

    def cancel(self, task_id: str, reason: str = "cancelled by request") -> bool:
        run = self.runs.get(task_id)
        return run is not None and run.stop(TaskState.CANCELLED, reason)

    def cancel_all(self, reason: str) -> int:
        """Cancel every running task (a drain's deadline); how many were."""
        return sum(1 for run in list(self.runs.values())
                   if run.stop(TaskState.CANCELLED, reason))

    def when_finished(self, task_id: str) -> defer.Deferred[Task] | None:
        """A Deferred firing with the final task, or None if it is not running here."""
        if task_id not in self.runs:
            return None
        return self._end_waiters.wait(task_id)

    def when_output_past(self, task_id: str, offset: int) -> defer.Deferred[None] | None:
        """Fires when the task has output beyond ``offset`` or ends; None if not running."""
        run = self.runs.get(task_id)
        if run is None:
            return None
        if run.task.output_bytes > offset:
            return defer.succeed(None)
        return self._output_waiters.wait(task_id, offset)

    def _wake_output_waiters(self, task_id: str, end: int | None) -> None:
        """Wake the waiters for output past an offset below ``end`` (all: the task ended)."""
        self._output_waiters.fire(task_id, None,
                               None if end is None else (lambda offset: end > cast(int, offset)))

    def live_task(self, task_id: str) -> Task | None:
        run = self.runs.get(task_id)
        return run.task if run is not None else None

    def _output(self, task: Task, offset: int, stream: str, data: bytes) -> None:
        self._store.append_output(task.id, offset, stream, data).addErrback(
            self._log_store_failure, task.id)
        self._wake_output_waiters(task.id, offset + len(data))
        if not self._output_paused and \
                getattr(self._store, "output_backlog", 0) > OUTPUT_BACKLOG_HIGH:
            self._pause_all_output()
        for listener in self.output_listeners:
            try:
                listener(task, offset, stream, data)
            except Exception:
                self.log.failure("output listener failed for task {task_id}", task_id=task.id)

    def _finished(self, run: TaskRun) -> None:
        task = run.task
        if (task.workspace or task.source) is not None and self._workspaces is not None:
            # Artifacts are kept before the end is announced: a client that sees the
            # task end finds them listed. The slot stays held meanwhile.
            collected = self._workspaces.finish(task)
            collected.addErrback(lambda failure: self.log.failure(
                "cannot collect the artifacts of task {task_id}", failure, task_id=task.id))
            collected.addCallback(lambda _: self._record_finished(run))
        else:
            self._record_finished(run)

    def _record_finished(self, run: TaskRun) -> None:
        task = run.task
        self.runs.pop(task.id, None)
        self.finished_total += 1
        # One line per task, at its end: on the hot path, logging is a real cost.
        self.log.info("task {task_id} ({command}) {state}: {reason}", task_id=task.id,
                      command=task.command, state=task.state.value, reason=task.reason)
        self._recording += 1
        stored = self._store.put_task(task)
        stored.addErrback(self._log_store_failure, task.id)
        stored.addBoth(self._recorded, task)
        self._notify_state(task)

    def _recorded(self, _: object, task: Task) -> None:
        self._recording -= 1
        self._wake_output_waiters(task.id, None)
        self._end_waiters.fire(task.id, task)
        if not self.runs and not self._recording:
            self._idle_waiters.fire(None, None)

    def _pause_all_output(self) -> None:
        """Backpressure: a task that writes faster than SQLite commits waits for it."""
        self._output_paused = True
        for run in self.runs.values():
            run.pause_output()
        self._store.when_backlog_below(OUTPUT_BACKLOG_LOW).addCallback(self._resume_all_output)

    def _resume_all_output(self, _: object) -> None:
        self._output_paused = False
        for run in self.runs.values():
            run.resume_output()

    def publish_state(self, task: Task) -> None:
        """Tell the state listeners of a change made outside a run (a queued task's end)."""
        self._notify_state(task)

    def _notify_state(self, task: Task) -> None:
        for listener in self.state_listeners:
            try:
                listener(task)
            except Exception:
                self.log.failure("state listener failed for task {task_id}", task_id=task.id)

    def _log_store_failure(self, failure: Failure, task_id: str) -> None:
        """Count every failed write; log the first of each task (a full disk fails them all)."""
        self.store_failures += 1
        if task_id not in self._store_failed_tasks:
            if len(self._store_failed_tasks) > 10_000:
                self._store_failed_tasks.clear()
            self._store_failed_tasks.add(task_id)
            self.log.error("could not record task {task_id}: {error}", task_id=task_id,
                           error=failure.getErrorMessage())

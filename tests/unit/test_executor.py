"""The executor's logic with a Clock and a fake process; real children at the end."""

from __future__ import annotations

import signal
import sys

import attrs
import psutil
import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, task
from twisted.python.failure import Failure

from oxide_cluster.cgroups import Resources, Usage
from oxide_cluster.executor import CapacityError, Executor, spawn_in_new_group
from oxide_cluster.model import TaskState, parse_task_request
from tests.support import poll_until


class MemoryStore:
    """Records what the executor persists."""

    def __init__(self):
        self.tasks = {}
        self.output = []

    def put_task(self, task):
        self.tasks[task.id] = attrs.evolve(task)
        return defer.succeed(None)

    def append_output(self, task_id, offset, stream, data):
        self.output.append((task_id, offset, stream, data))
        return defer.succeed(None)

    def mark_unfinished_lost(self, node_id, reason, now):
        return defer.succeed([])


@attrs.define
class FakeProcess:
    pid: int
    protocol: object
    args: list
    env: dict
    path: str | None
    flow: list = attrs.field(factory=list)

    def pauseProducing(self):
        self.flow.append("pause")

    def resumeProducing(self):
        self.flow.append("resume")

    def exit(self, code=0, signal_number=None):
        if signal_number is not None:
            reason = Failure(error.ProcessTerminated(None, signal_number, None))
        elif code == 0:
            reason = Failure(error.ProcessDone(0))
        else:
            reason = Failure(error.ProcessTerminated(code, None, None))
        self.protocol.processExited(reason)
        self.protocol.processEnded(reason)


class Harness:
    def __init__(self, **options):
        self.clock = task.Clock()
        self.store = MemoryStore()
        self.processes = []
        self.signals = []
        self.cgroup_procs = []
        self.load = (10.0, 10.0)
        defaults = dict(max_tasks=2, kill_grace=5.0, output_limit=1000, default_timeout=60.0,
                        max_cpu_percent=90.0, max_memory_percent=90.0)
        defaults.update(options)
        self.executor = Executor(self.clock, self.store, "node-a", load=lambda: self.load,
                                 spawn=self.spawn, signal_group=self.signal, **defaults)
        self.executor.ready = True

    def spawn(self, reactor, protocol, executable, args, env, path, tty=False,
              cgroup_procs=()):
        self.cgroup_procs.append(cgroup_procs)
        process = FakeProcess(1000 + len(self.processes), protocol, args, env, path)
        self.processes.append(process)
        protocol.makeConnection(FakeTransport())
        return process

    def signal(self, pgid, number):
        self.signals.append((pgid, number))

    def submit(self, **body):
        body.setdefault("command", "sh")
        request = parse_task_request(body, max_timeout=3600)
        return self.executor.submit(request)


class FakeTransport:
    def closeStdin(self):
        pass


def started(harness, **body):
    result = []
    harness.submit(**body).addCallback(result.append)
    return result[0]


def test_success_is_recorded_with_exit_code():
    harness = Harness()
    task_ = started(harness)
    assert task_.state is TaskState.RUNNING
    harness.processes[0].exit(0)
    assert task_.state is TaskState.SUCCEEDED and task_.exit_code == 0
    assert harness.store.tasks[task_.id].state is TaskState.SUCCEEDED
    assert harness.executor.free_slots == 2


def test_nonzero_exit_fails_with_code_and_signal_is_named():
    harness = Harness()
    first, second = started(harness), started(harness)
    harness.processes[0].exit(3)
    harness.processes[1].exit(signal_number=signal.SIGKILL)
    assert (first.state, first.exit_code, first.reason) == (
        TaskState.FAILED, 3, "exited with code 3")
    assert second.state is TaskState.FAILED and second.signal == signal.SIGKILL
    assert second.reason == "killed by SIGKILL"


def test_timeout_sends_term_then_kill_after_grace():
    harness = Harness()
    task_ = started(harness, timeout=10)
    harness.clock.advance(9.9)
    assert harness.signals == []
    harness.clock.advance(0.2)
    assert harness.signals == [(1000, signal.SIGTERM)]
    harness.clock.advance(4.9)
    assert harness.signals == [(1000, signal.SIGTERM)]
    harness.clock.advance(0.2)
    assert harness.signals[-1] == (1000, signal.SIGKILL)
    harness.processes[0].exit(signal_number=signal.SIGKILL)
    assert task_.state is TaskState.TIMED_OUT
    assert task_.reason == "timed out after 10s"


def test_process_ending_on_term_needs_no_kill():
    harness = Harness()
    task_ = started(harness)
    assert harness.executor.cancel(task_.id)
    harness.processes[0].exit(signal_number=signal.SIGTERM)
    harness.clock.advance(60)
    # exited() kills the group's leftovers; no SIGKILL from the grace timer.
    assert harness.signals == [(1000, signal.SIGTERM), (1000, signal.SIGKILL)]
    assert task_.state is TaskState.CANCELLED and task_.reason == "cancelled by request"
    assert not harness.executor.cancel(task_.id)


def test_idle_timeout_is_reset_by_output():
    harness = Harness()
    task_ = started(harness, idle_timeout=3)
    protocol = harness.processes[0].protocol
    for _ in range(5):
        harness.clock.advance(2)
        protocol.outReceived(b"tick\n")
    assert harness.signals == []
    harness.clock.advance(3.1)
    assert harness.signals == [(1000, signal.SIGTERM)]
    harness.processes[0].exit(signal_number=signal.SIGTERM)
    assert task_.state is TaskState.TIMED_OUT and "idle" in task_.reason


def test_unkillable_process_is_given_up_and_slot_freed():
    harness = Harness(kill_grace=1.0)
    task_ = started(harness)
    harness.executor.cancel(task_.id)
    harness.clock.advance(1.0)
    harness.clock.advance(10.0)
    assert task_.state is TaskState.CANCELLED
    assert "did not exit after SIGKILL" in task_.reason
    assert harness.executor.free_slots == 2


def test_output_chunks_have_ordered_offsets_and_cap():
    harness = Harness(output_limit=10)
    task_ = started(harness)
    protocol = harness.processes[0].protocol
    protocol.outReceived(b"abcd")
    protocol.errReceived(b"efgh")
    protocol.outReceived(b"ijklmn")
    protocol.outReceived(b"zz")
    harness.processes[0].exit(0)
    assert harness.store.output == [
        (task_.id, 0, "stdout", b"abcd"),
        (task_.id, 4, "stderr", b"efgh"),
        (task_.id, 8, "stdout", b"ij"),
    ]
    assert task_.output_bytes == 10 and task_.output_dropped == 6
    assert "6 bytes of output over the limit dropped" in task_.reason


def test_missing_command_and_cwd_fail_without_spawning(tmp_path):
    harness = Harness()
    missing = started(harness, command="no-such-command-here")
    no_dir = started(harness, cwd=str(tmp_path / "absent"))
    assert harness.processes == []
    assert missing.state is TaskState.FAILED and missing.reason.startswith("command not found")
    assert no_dir.state is TaskState.FAILED and no_dir.reason.startswith("cwd does not exist")
    assert harness.executor.free_slots == 2


def test_environment_is_minimal_plus_request_and_secret_not_recorded():
    harness = Harness()
    task_ = started(harness, env={"A": "1"}, secret_env={"TOKEN": "s3cret"})
    env = harness.processes[0].env
    assert env["A"] == "1" and env["TOKEN"] == "s3cret"
    assert env["OXIDE_TASK_ID"] == task_.id
    assert "OXIDE_CLUSTER_SECRET" not in env
    stored = harness.store.tasks[task_.id]
    assert "s3cret" not in repr(stored) and stored.secret_env_keys == ["TOKEN"]


def test_capacity_refusals():
    harness = Harness(max_tasks=1)
    started(harness)
    with pytest.raises(CapacityError) as slots:
        harness.submit()
    assert slots.value.status == 429 and slots.value.retry_after >= 1
    harness.processes[0].exit(0)
    harness.load = (95.0, 10.0)
    with pytest.raises(CapacityError) as cpu:
        harness.submit()
    assert cpu.value.status == 503 and cpu.value.code == "cpu_busy"
    harness.load = (10.0, 99.0)
    with pytest.raises(CapacityError) as memory:
        harness.submit()
    assert memory.value.code == "memory_busy"


def test_not_ready_refuses_and_shutdown_cancels_everything():
    harness = Harness()
    harness.executor.ready = False
    with pytest.raises(CapacityError, match="starting"):
        harness.submit()
    harness.executor.ready = True
    first, second = started(harness), started(harness)
    stopped = harness.executor.stopService()
    assert not stopped.called
    for process in harness.processes:
        process.exit(signal_number=signal.SIGTERM)
    assert stopped.called
    assert {first.reason, second.reason} == {"agent shutdown"}
    assert first.state is TaskState.CANCELLED
    with pytest.raises(CapacityError, match="shutting down"):
        harness.submit()


def test_waiters_get_the_final_task():
    harness = Harness()
    task_ = started(harness)
    waiter = harness.executor.when_finished(task_.id)
    assert not waiter.called
    harness.processes[0].exit(0)
    assert waiter.result.state is TaskState.SUCCEEDED
    assert harness.executor.when_finished(task_.id) is None


# -- real child processes ---------------------------------------------------------


def real_executor(tmp_path, **options):
    from twisted.internet import reactor

    defaults = dict(max_tasks=4, kill_grace=2.0, output_limit=1 << 20, default_timeout=60.0)
    defaults.update(options)
    executor = Executor(reactor, MemoryStore(), "node-real", **defaults)
    executor.ready = True
    return executor


@pytest_twisted.ensureDeferred
async def test_cancel_kills_grandchildren(tmp_path):
    executor = real_executor(tmp_path)
    request = parse_task_request(
        {"command": "sh", "args": ["-c", "sleep 300 & sleep 300 & echo ready; wait"]}, 3600)
    said_ready: defer.Deferred[None] = defer.Deferred()
    executor.output_listeners.append(
        lambda task, offset, stream, data: said_ready.called or said_ready.callback(None))
    task_ = await executor.submit(request)
    group = task_.pid
    done = executor.when_finished(task_.id)
    await said_ready.addTimeout(10, reactor_())
    members = [p for p in psutil.process_iter() if _pgid(p) == group]
    assert len(members) >= 2
    executor.cancel(task_.id)
    final = await done
    assert final.state is TaskState.CANCELLED
    poll_until(lambda: not [p for p in psutil.process_iter()
                            if _pgid(p) == group and _alive(p)],
               timeout=5, message="no survivor in the task's group")


@pytest_twisted.ensureDeferred
async def test_leftover_background_process_does_not_hold_the_task(tmp_path):
    executor = real_executor(tmp_path)
    request = parse_task_request(
        {"command": sys.executable, "args": ["-c", (
            "import subprocess; subprocess.Popen(['sleep', '300']); print('bye')")]}, 3600)
    task_ = await executor.submit(request)
    final = await executor.when_finished(task_.id)
    assert final.state is TaskState.SUCCEEDED
    # The killed sleep closed its pipes (so the task ended) a moment before the kernel
    # makes it a zombie: allow that moment.
    poll_until(lambda: not [p for p in psutil.process_iter()
                            if _pgid(p) == task_.pid and _alive(p)],
               timeout=5, message="no live process in the task's group")


def reactor_():
    from twisted.internet import reactor

    return reactor


def _pgid(process):
    try:
        import os

        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def _alive(process):
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class SlowStore(MemoryStore):
    """Output commits only when the test says so, like a busy disk."""

    def __init__(self):
        super().__init__()
        self.output_backlog = 0
        self.pending = []
        self.drain = []

    def append_output(self, task_id, offset, stream, data):
        self.output_backlog += len(data)
        done = defer.Deferred()
        self.pending.append((len(data), done))
        return done

    def commit_all(self):
        for size, done in self.pending:
            self.output_backlog -= size
            done.callback(None)
        self.pending = []
        for limit, waiter in self.drain:
            if self.output_backlog <= limit:
                waiter.callback(None)

    def when_backlog_below(self, limit):
        waiter = defer.Deferred()
        self.drain.append((limit, waiter))
        return waiter


def test_output_backpressure_pauses_and_resumes_task_pipes():
    from oxide_cluster.executor import OUTPUT_BACKLOG_HIGH

    harness = Harness(output_limit=1 << 30)
    harness.store = harness.executor._store = SlowStore()
    started(harness)
    process = harness.processes[0]
    paused = process.flow
    chunk = b"x" * (1024 * 1024)
    for _ in range(OUTPUT_BACKLOG_HIGH // len(chunk)):
        process.protocol.outReceived(chunk)
    assert paused == []
    process.protocol.outReceived(chunk)
    assert paused == ["pause"]
    process.protocol.outReceived(chunk)  # already in flight when paused: still kept
    assert paused == ["pause"]
    harness.store.commit_all()
    assert paused == ["pause", "resume"]


def test_spawn_raising_anything_fails_the_task_and_frees_its_slot():
    """A spawn error other than OSError (argv/environ that cannot be encoded) once left the
    run half-started, holding its slot for ever: two such requests made a node refuse all."""
    harness = Harness()

    def refuse(*args, **kwargs):
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

    harness.spawn = refuse  # type: ignore[method-assign]
    harness.executor._spawn = refuse
    failed = [started(harness), started(harness), started(harness)]
    assert all(t.state is TaskState.FAILED for t in failed)
    assert failed[0].reason.startswith("cannot start sh")
    assert harness.executor.free_slots == 2


class FakeCgroup:
    """A task cgroup whose members, accounting and OOM count the test sets."""

    def __init__(self, name, resources):
        self.name = name
        self.resources = resources
        self.members = 0
        self.events = []
        self.oom = 0
        self.removed = False

    @property
    def procs_files(self):
        return (f"/fake/{self.name}/cgroup.procs",)

    def signal_all(self, number):
        self.events.append(("signal_all", number))

    def kill(self):
        self.events.append("kill")

    def populated(self):
        self.events.append("populated")
        return self.members > 0

    def oom_kills(self):
        return self.oom

    def usage(self):
        return Usage(cpu_seconds=1.25, memory_peak_bytes=4096, processes_peak=3,
                     source="cgroup")

    def remove(self):
        if self.members:
            raise OSError(16, "Device or resource busy")
        self.removed = True


class FakeCgroups:
    mode = "v1"

    def __init__(self, fail=None, left=()):
        self.made = []
        self.fail = fail
        self.left = list(left)

    def leftovers(self):
        for cgroup in self.left:
            cgroup.kill()
        return list(self.left)

    def describe(self):
        return {"mode": "v1"}

    def create(self, name, resources):
        if self.fail is not None:
            raise self.fail
        self.made.append(FakeCgroup(name, resources))
        return self.made[-1]

    def release(self, cgroup, empty):
        cgroup.released_empty = empty
        cgroup.remove()

    def close(self):
        pass


def test_the_child_is_given_its_cgroup_and_limits_with_defaults():
    cgroups = FakeCgroups()
    harness = Harness(cgroups=cgroups, default_resources=Resources(pids=100, cpus=2.0))
    task_ = started(harness, resources={"memory": "64M", "cpus": 0.5})
    assert harness.cgroup_procs == [(f"/fake/{task_.id}/cgroup.procs",)]
    assert cgroups.made[0].resources == Resources(cpus=0.5, memory=64 * 1024 ** 2, pids=100)
    assert task_.resources == {"cpus": 0.5, "memory": 64 * 1024 ** 2, "pids": 100}


def test_task_ends_only_when_its_cgroup_is_empty_then_usage_and_removal():
    cgroups = FakeCgroups()
    harness = Harness(cgroups=cgroups)
    task_ = started(harness)
    cgroup = cgroups.made[0]
    cgroup.members = 2  # a setsid escape and its child
    harness.processes[0].exit(0)
    assert "kill" in cgroup.events  # at the main process's exit, not later
    assert task_.state is TaskState.RUNNING and not cgroup.removed
    harness.clock.advance(0.05)
    assert task_.state is TaskState.RUNNING
    cgroup.members = 0
    harness.clock.advance(0.05)
    assert task_.state is TaskState.SUCCEEDED and cgroup.removed
    assert task_.usage == {"cpu_seconds": 1.25, "memory_peak_bytes": 4096,
                           "processes_peak": 3, "source": "cgroup"}
    assert task_.oom_killed is False


def test_an_empty_cgroup_is_not_killed_at_exit():
    cgroups = FakeCgroups()
    harness = Harness(cgroups=cgroups)
    task_ = started(harness)
    harness.processes[0].exit(0)
    assert task_.state is TaskState.SUCCEEDED and cgroups.made[0].removed
    assert "kill" not in cgroups.made[0].events  # nothing left: a read, no kill write


def test_a_cgroup_seen_empty_is_read_once_and_released_as_empty():
    cgroups = FakeCgroups()
    harness = Harness(cgroups=cgroups)
    task_ = started(harness)
    harness.processes[0].exit(0)
    assert task_.state is TaskState.SUCCEEDED
    assert cgroups.made[0].events == ["populated"]  # it stays empty: one read is enough
    assert cgroups.made[0].released_empty is True


def test_a_cgroup_still_populated_at_the_give_up_is_released_as_not_empty():
    cgroups = FakeCgroups()
    harness = Harness(cgroups=cgroups)
    started(harness)
    cgroups.made[0].members = 1
    harness.processes[0].exit(0)
    harness.clock.pump([0.5] * 11)
    assert cgroups.made[0].released_empty is False


def test_oom_kill_fails_the_task_naming_the_limit():
    cgroups = FakeCgroups()
    harness = Harness(cgroups=cgroups)
    task_ = started(harness, resources={"memory": "64M"})
    cgroups.made[0].oom = 1
    harness.processes[0].exit(signal_number=signal.SIGKILL)
    assert task_.state is TaskState.FAILED and task_.oom_killed is True
    assert task_.reason == ("out of memory: the kernel's OOM killer ended 1 process(es) at "
                            "its memory limit (64 MiB); the command killed by SIGKILL")
    assert task_.to_json()["oom_killed"] is True


def test_cancel_terms_the_cgroup_then_kills_it_after_grace():
    cgroups = FakeCgroups()
    harness = Harness(cgroups=cgroups, kill_grace=5.0)
    task_ = started(harness)
    cgroup = cgroups.made[0]
    harness.executor.cancel(task_.id)
    assert [event for event in cgroup.events if event != "populated"] == \
        [("signal_all", signal.SIGTERM)]
    harness.clock.advance(5.0)
    assert cgroup.events[-1] == "kill"


def test_a_cgroup_that_stays_populated_is_given_up_after_the_deadline():
    cgroups = FakeCgroups()
    harness = Harness(cgroups=cgroups)
    task_ = started(harness)
    cgroups.made[0].members = 1
    harness.processes[0].exit(0)
    harness.clock.pump([0.5] * 11)
    assert task_.state is TaskState.SUCCEEDED  # recorded; the stuck member is logged
    assert task_.usage is not None and not cgroups.made[0].removed


def test_a_cgroup_that_cannot_be_made_fails_the_task():
    harness = Harness(cgroups=FakeCgroups(fail=PermissionError(13, "Permission denied")))
    task_ = started(harness)
    assert task_.state is TaskState.FAILED
    assert task_.reason.startswith("cannot create the task's cgroup:")
    assert harness.processes == []


class _Collect(protocol.ProcessProtocol):
    def __init__(self):
        self.out = b""
        self.ended: defer.Deferred[BaseException] = defer.Deferred()

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.out += data

    def processEnded(self, reason):
        self.ended.callback(reason.value)  # the exception, not a Failure: not an error


@pytest_twisted.ensureDeferred
async def test_spawned_child_joins_its_cgroups_before_the_command_runs(tmp_path):
    procs = (str(tmp_path / "a.procs"), str(tmp_path / "b.procs"))
    for name in procs:
        open(name, "w").close()
    script = "cat {} {}; echo $$; tr '\\0' ' ' < /proc/$$/cmdline; echo; pwd".format(*procs)
    proto = _Collect()
    process = spawn_in_new_group(reactor_(), proto, "/bin/sh", ["sh", "-c", script],
                                 {"PATH": "/usr/bin:/bin"}, str(tmp_path), cgroup_procs=procs)
    pid = process.pid
    await proto.ended
    lines = proto.out.decode().splitlines()
    # each file got the pid, then the command ran as that same process, argv[0] kept
    assert lines[:3] == [str(pid)] * 3, lines
    assert lines[3] == "sh -c " + script.replace("\n", " ") + " ", lines
    assert lines[4] == str(tmp_path)


@pytest_twisted.ensureDeferred
async def test_a_cgroup_that_cannot_be_joined_stops_the_command_before_it_runs(tmp_path):
    proto = _Collect()
    marker = tmp_path / "ran"
    spawn_in_new_group(reactor_(), proto, "/bin/sh", ["sh", "-c", f"touch {marker}"],
                       {"PATH": "/usr/bin:/bin"}, None,
                       cgroup_procs=(str(tmp_path / "missing" / "cgroup.procs"),))
    reason = await proto.ended
    assert reason.exitCode == 127 and not marker.exists()


def test_cgroups_a_killed_agent_left_are_killed_emptied_and_removed_at_start():
    dying, stuck, empty = FakeCgroup("a", None), FakeCgroup("b", None), FakeCgroup("c", None)
    dying.members, stuck.members = 2, 1
    harness = Harness(cgroups=FakeCgroups(left=[dying, stuck, empty]))
    recovered = defer.Deferred.fromCoroutine(harness.executor.recover())
    assert not recovered.called  # waits for the killed processes to go
    harness.clock.advance(0.05)
    dying.members = 0  # the kill took
    harness.clock.advance(0.05)
    assert not recovered.called and dying.events.count("kill") >= 2
    harness.clock.advance(10)  # the stuck one (D state) is given up on; the rest go
    assert recovered.called
    assert dying.removed and empty.removed and not stuck.removed


@pytest.mark.parametrize("path_entry", ["/usr/bin:/bin", "bin:/usr/bin:/bin"],
                         ids=["posix_spawn", "fork"])
@pytest_twisted.ensureDeferred
async def test_the_child_starts_with_the_agents_signal_mask_and_the_agents_is_unchanged(
        path_entry):
    # A relative PATH entry takes the fork path (signals blocked across the fork); the
    # posix_spawn path only reads the mask. Either way nothing stays blocked.
    before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    proto = _Collect()
    spawn_in_new_group(reactor_(), proto, "/bin/sh",
                       ["sh", "-c", "grep SigBlk /proc/self/status"],
                       {"PATH": path_entry}, None)
    await proto.ended
    assert proto.out.split() == [b"SigBlk:", b"0" * 16]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == before == set()


@pytest.mark.parametrize("path_entry", ["/usr/bin:/bin", "bin:/usr/bin:/bin"],
                         ids=["posix_spawn", "fork"])
@pytest_twisted.ensureDeferred
async def test_the_child_reads_eof_from_dev_null_and_inherits_only_its_three_streams(
        path_entry):
    proto = _Collect()
    spawn_in_new_group(reactor_(), proto, "/bin/sh",
                       ["sh", "-c", "readlink /proc/$$/fd/0; ls /proc/$$/fd | tr '\\n' ' ';"
                                    " echo; cat; echo end"],
                       {"PATH": path_entry}, None)
    await proto.ended.addTimeout(10, reactor_())  # with a pipe left open, cat would wait
    assert proto.out.decode().splitlines() == ["/dev/null", "0 1 2 ", "end"]


def test_command_paths_are_searched_again_after_their_ttl(tmp_path):
    from oxide_cluster.executor import CommandPaths

    clock = task.Clock()
    paths = CommandPaths(clock, ttl=1.0)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    tool = second / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    search = f"{first}:{second}"
    assert paths.which("tool", search) == str(tool)
    shadow = first / "tool"
    shadow.write_text("#!/bin/sh\n")
    shadow.chmod(0o755)
    assert paths.which("tool", search) == str(tool)  # within the ttl: the known answer
    clock.advance(1.0)
    assert paths.which("tool", search) == str(shadow)
    shadow.unlink()  # removed within the ttl: found again where it still is
    assert paths.which("tool", search) == str(tool)
    tool.unlink()
    assert paths.which("tool", search) is None

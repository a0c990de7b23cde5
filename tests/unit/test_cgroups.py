"""Cgroup providers against temporary directories laid out like a cgroup filesystem."""

from __future__ import annotations

import signal

import pytest

from oxide_cluster import cgroups
from oxide_cluster.cgroups import (
    OffProvider,
    ResourceError,
    Resources,
    V1Cgroup,
    V1Provider,
    V2Provider,
    detect,
    parse_resources,
)

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / {root}/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / {root}/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / {root}/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / {root}/freezer rw,relatime - cgroup cgroup rw,freezer
41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw
"""
PROC_CGROUP = "8:pids:/\n6:freezer:/\n4:memory:/sandbox/a1\n2:cpuacct:/\n1:cpu:/\n0::/\n"


def _rmdir_fake(path):
    """A fake cgroup directory holds plain files, which the kernel's would not."""
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


class Kills:
    def __init__(self):
        self.sent = []

    def __call__(self, pid, number):
        self.sent.append((pid, number))


@pytest.mark.parametrize("value, expected", [
    ({"cpus": 1.5, "memory": "2G", "pids": 512},
     Resources(cpus=1.5, memory=2 * 1024 ** 3, pids=512)),
    ({"memory": 64 * 1024 * 1024}, Resources(memory=64 * 1024 * 1024)),
    ({"memory": "1.5GiB"}, Resources(memory=3 * 1024 ** 3 // 2)),
    ({"memory": "512M", "pids": 3.0}, Resources(memory=512 * 1024 ** 2, pids=3)),
    ({}, Resources()),
])
def test_resources_parse(value, expected):
    assert parse_resources(value) == expected


@pytest.mark.parametrize("value, field", [
    ({"cpus": 0}, "resources.cpus"),
    ({"cpus": "many"}, "resources.cpus"),
    ({"cpus": True}, "resources.cpus"),
    ({"memory": "2X"}, "resources.memory"),
    ({"memory": 1000}, "resources.memory"),
    ({"pids": 0}, "resources.pids"),
    ({"pids": 1.5}, "resources.pids"),
    ({"disk": "1G"}, "resources.disk"),
    ([], "resources"),
])
def test_bad_resources_name_the_field(value, field):
    with pytest.raises(ResourceError) as caught:
        parse_resources(value)
    assert caught.value.field == field


def test_declared_resources_override_defaults_key_by_key():
    defaults = Resources(cpus=1.0, memory=1024 ** 3, pids=100)
    assert Resources(memory=2 * 1024 ** 3).over(defaults) == Resources(
        cpus=1.0, memory=2 * 1024 ** 3, pids=100)


def _v1_host(tmp_path):
    for name in ("cpu", "cpuacct", "memory/sandbox/a1", "pids", "freezer", "unified"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "unified" / "cgroup.controllers").write_text("\n")
    return MOUNTINFO.format(root=tmp_path)


def test_detect_v1_nests_under_the_agents_own_cgroups(tmp_path):
    provider = detect("auto", "n1", mountinfo=_v1_host(tmp_path), proc_cgroup=PROC_CGROUP)
    assert provider.mode == "v1"
    assert isinstance(provider, V1Provider)
    assert provider.bases["memory"] == tmp_path / "memory/sandbox/a1/oxide-n1"
    assert provider.bases["pids"] == tmp_path / "pids/oxide-n1"
    assert provider.unified == tmp_path / "unified/oxide-n1"
    assert provider.describe()["kill"] == "cgroup.kill"


def test_detect_without_a_memory_hierarchy_is_off_and_says_why(tmp_path):
    mountinfo = _v1_host(tmp_path).replace("cgroup rw,memory", "cgroup rw,hugetlb")
    provider = detect("auto", "n1", mountinfo=mountinfo, proc_cgroup=PROC_CGROUP)
    assert provider.mode == "off"
    why = provider.describe()["why"]
    assert "lacks the cpu, memory, pids controller(s)" in why
    assert "v1: no writable memory hierarchy" in why


def test_detect_without_any_cgroup_mount_is_off(tmp_path):
    provider = detect("auto", "n1", mountinfo="", proc_cgroup="")
    assert provider.mode == "off" and "no cgroup2" in provider.describe()["why"]
    with pytest.raises(cgroups.CgroupUnavailable, match="v1: no writable"):
        detect("v1", "n1", mountinfo="", proc_cgroup="")
    assert detect("off", "n1").mode == "off"


def test_v1_create_writes_limits_and_enters_every_hierarchy(tmp_path):
    _v1_host(tmp_path)
    provider = V1Provider({name: tmp_path / name for name in ("cpu", "memory", "pids")},
                          tmp_path / "unified", rmdir=_rmdir_fake)
    cgroup = provider.create("t1", Resources(cpus=1.5, memory=64 * 1024 ** 2, pids=32))
    assert (tmp_path / "cpu/t1/cpu.cfs_quota_us").read_text() == "150000"
    assert (tmp_path / "cpu/t1/cpu.cfs_period_us").read_text() == "100000"
    assert (tmp_path / "memory/t1/memory.limit_in_bytes").read_text() == str(64 * 1024 ** 2)
    assert (tmp_path / "pids/t1/pids.max").read_text() == "32"
    assert set(cgroup.procs_files) == {str(tmp_path / name / "t1" / "cgroup.procs")
                                       for name in ("cpu", "memory", "pids", "unified")}
    cgroup.remove()
    assert not any((tmp_path / name / "t1").exists() for name in ("cpu", "memory", "unified"))


def test_v1_tasks_skip_freezer_and_cpuacct_where_the_unified_cgroup_replaces_them(tmp_path):
    names = ("cpu", "cpuacct", "memory", "pids", "freezer")
    for name in (*names, "unified"):
        (tmp_path / name).mkdir()
    bases = {name: tmp_path / name for name in names}
    assert V1Provider(bases, tmp_path / "unified").per_task == bases  # no kill, no cpu.stat
    (tmp_path / "unified" / "cgroup.kill").write_text("")
    (tmp_path / "unified" / "cpu.stat").write_text("usage_usec 0\n")
    provider = V1Provider(bases, tmp_path / "unified")
    cgroup = provider.create("t1", Resources())
    assert set(cgroup.procs_files) == {str(tmp_path / name / "t1" / "cgroup.procs")
                                       for name in ("cpu", "memory", "pids", "unified")}
    assert not (tmp_path / "freezer/t1").exists() and not (tmp_path / "cpuacct/t1").exists()


def test_v1_create_failure_removes_what_it_made(tmp_path):
    _v1_host(tmp_path)
    provider = V1Provider({"memory": tmp_path / "memory", "pids": tmp_path / "nowhere"},
                          None, rmdir=_rmdir_fake)
    with pytest.raises(FileNotFoundError):
        provider.create("t1", Resources())
    assert not (tmp_path / "memory" / "t1").exists()


def test_v1_kill_uses_cgroup_kill_of_the_unified_hierarchy(tmp_path):
    for name in ("memory", "pids", "unified"):
        (tmp_path / name).mkdir()
    (tmp_path / "unified" / "cgroup.kill").write_text("")
    kills = Kills()
    cgroup = V1Cgroup({"memory": tmp_path / "memory", "pids": tmp_path / "pids"},
                      tmp_path / "unified", kill=kills)
    cgroup.kill()
    assert (tmp_path / "unified" / "cgroup.kill").read_text() == "1"
    assert kills.sent == []


def test_v1_kill_freezes_kills_every_member_and_thaws(tmp_path):
    states = []

    class Freezer(Kills):
        def __call__(self, pid, number):
            states.append((tmp_path / "freezer" / "freezer.state").read_text())
            super().__call__(pid, number)

    for name in ("memory", "freezer"):
        (tmp_path / name).mkdir()
    (tmp_path / "freezer" / "cgroup.procs").write_text("11\n12\n13\n")
    kills = Freezer()
    cgroup = V1Cgroup({"memory": tmp_path / "memory", "freezer": tmp_path / "freezer"}, None,
                      kill=kills)
    cgroup.kill()
    assert kills.sent == [(11, signal.SIGKILL), (12, signal.SIGKILL), (13, signal.SIGKILL)]
    assert states == ["FROZEN"] * 3  # no member could fork between list and kill
    assert (tmp_path / "freezer" / "freezer.state").read_text() == "THAWED"


def test_v1_usage_and_oom_from_the_accounting_files(tmp_path):
    for name in ("memory", "pids", "cpuacct"):
        (tmp_path / name).mkdir()
    (tmp_path / "cpuacct/cpuacct.usage").write_text("1234500000\n")
    (tmp_path / "memory/memory.max_usage_in_bytes").write_text("67108864\n")
    (tmp_path / "memory/memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (tmp_path / "pids/pids.peak").write_text("7\n")
    (tmp_path / "pids/cgroup.procs").write_text("")
    cgroup = V1Cgroup({name: tmp_path / name for name in ("memory", "pids", "cpuacct")}, None)
    usage = cgroup.usage()
    assert usage.to_json() == {"cpu_seconds": 1.2345, "memory_peak_bytes": 67108864,
                               "processes_peak": 7, "source": "cgroup"}
    assert cgroup.oom_kills() == 2
    assert not cgroup.populated()


def test_v2_delegate_moves_the_agent_to_a_leaf_and_enables_controllers(tmp_path):
    own = tmp_path / "service"
    own.mkdir()
    (own / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (own / "cgroup.procs").write_text("4242\n")
    provider = V2Provider.delegate(own, "n1", rmdir=_rmdir_fake)
    assert (own / "agent" / "cgroup.procs").read_text() == "4242"
    assert (own / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (own / "oxide-n1" / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert provider.describe()["controllers"] == ["cpu", "memory", "pids"]
    cgroup = provider.create("t1", Resources(cpus=0.5, memory=128 * 1024 ** 2, pids=64))
    path = own / "oxide-n1" / "t1"
    assert (path / "cpu.max").read_text() == "50000 100000"
    assert (path / "memory.max").read_text() == str(128 * 1024 ** 2)
    assert (path / "pids.max").read_text() == "64"
    assert cgroup.procs_files == (str(path / "cgroup.procs"),)
    (path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    (path / "memory.peak").write_text("1048576\n")
    (path / "pids.peak").write_text("3\n")
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    (path / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    assert cgroup.usage().to_json() == {"cpu_seconds": 2.5, "memory_peak_bytes": 1048576,
                                        "processes_peak": 3, "source": "cgroup"}
    assert cgroup.oom_kills() == 1 and not cgroup.populated()
    cgroup.kill()
    assert (path / "cgroup.kill").read_text() == "1"
    cgroup.remove()
    assert not path.exists()


def test_detect_v2_with_a_configured_root(tmp_path):
    root = tmp_path / "delegated"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    provider = detect("v2", "n1", cgroup_root=str(root), mountinfo="", proc_cgroup="")
    assert provider.mode == "v2"
    assert provider.describe()["root"] == str(root / "oxide-n1")


def test_auto_prefers_v1_controllers_over_a_bare_v2_but_v2_can_be_forced(tmp_path):
    mountinfo = _v1_host(tmp_path)
    assert detect("auto", "n1", mountinfo=mountinfo, proc_cgroup=PROC_CGROUP).mode == "v1"
    forced = detect("v2", "n1", mountinfo=mountinfo, proc_cgroup=PROC_CGROUP)
    assert forced.mode == "v2" and forced.describe()["controllers"] == []


def test_off_provider_makes_no_cgroup():
    assert OffProvider().create("t1", Resources(memory=2 ** 30)) is None


def _pooled_host(tmp_path):
    """A v1 provider whose unified cgroup has cgroup.kill and cpu.stat (as here)."""
    for name in ("cpu", "memory", "pids", "unified"):
        (tmp_path / name).mkdir()
    (tmp_path / "unified" / "cgroup.kill").write_text("")
    (tmp_path / "unified" / "cpu.stat").write_text("usage_usec 0\n")
    bases = {name: tmp_path / name for name in ("cpu", "memory", "pids")}
    return V1Provider(bases, tmp_path / "unified", rmdir=_rmdir_fake)


def _ran(tmp_path, name, *, usec, peak, charged, oom=0, max_usage=None):
    """Write what the kernel's accounting shows after a task ran in cgroup ``name``."""
    (tmp_path / "unified" / name / "cpu.stat").write_text(f"usage_usec {usec}\n")
    (tmp_path / "unified" / name / "cgroup.procs").write_text("")
    (tmp_path / "pids" / name / "pids.peak").write_text(f"{peak}\n")
    memory = tmp_path / "memory" / name
    (memory / "memory.usage_in_bytes").write_text(f"{charged}\n")
    (memory / "memory.max_usage_in_bytes").write_text(f"{max_usage or charged}\n")
    (memory / "memory.oom_control").write_text(f"oom_kill_disable 0\noom_kill {oom}\n")


def test_v1_an_emptied_cgroup_serves_the_next_task_with_its_counters_reset(tmp_path):
    provider = _pooled_host(tmp_path)
    first = provider.create("t1", Resources(pids=32))
    _ran(tmp_path, "t1", usec=1_500_000, peak=1, charged=300_000, max_usage=5_000_000)
    assert first.usage().cpu_seconds == 1.5 and first.oom_kills() == 0
    provider.release(first, empty=True)
    assert provider.idle == [first] and (tmp_path / "memory/t1").is_dir()
    # the peak restarts from what is charged now (the kernel's answer to writing 0)
    assert (tmp_path / "memory/t1/memory.max_usage_in_bytes").read_text() == "0"
    (tmp_path / "pids/t1/pids.max").unlink()
    second = provider.create("t2", Resources(pids=32, cpus=0.5))
    assert second is first and (provider.made, provider.reused) == (1, 1)
    assert not (tmp_path / "pids/t1/pids.max").exists()  # unchanged: not written again
    assert (tmp_path / "cpu/t1/cpu.cfs_quota_us").read_text() == "50000"
    _ran(tmp_path, "t1", usec=2_000_000, peak=1, charged=300_000)
    assert second.usage().cpu_seconds == 0.5  # this task's, not the cgroup's total
    provider.release(second, empty=True)
    third = provider.create("t3", Resources())  # the limits go back to unlimited
    assert third is first and third.limits == Resources()
    assert (tmp_path / "cpu/t1/cpu.cfs_quota_us").read_text() == "-1"
    assert (tmp_path / "pids/t1/pids.max").read_text() == "max"


@pytest.mark.parametrize("ran, empty", [
    ({"peak": 2, "charged": 0}, True),  # pids.peak cannot be reset
    ({"peak": 1, "charged": 0, "oom": 1}, True),  # nor the OOM kill count
    ({"peak": 1, "charged": cgroups.RECYCLE_MAX_CHARGE + 1}, True),  # too much charged
    ({"peak": 1, "charged": 0}, False),  # not known to be empty
], ids=["forked", "oom-killed", "charged", "not-empty"])
def test_v1_a_cgroup_the_next_task_would_see_traces_in_is_removed(tmp_path, ran, empty):
    provider = _pooled_host(tmp_path)
    cgroup = provider.create("t1", Resources())
    _ran(tmp_path, "t1", usec=1000, **ran)
    cgroup.usage()
    provider.release(cgroup, empty=empty)
    assert provider.idle == [] and not (tmp_path / "memory/t1").exists()
    assert provider.create("t2", Resources()) is not cgroup
    assert (tmp_path / "memory/t2").is_dir()


def test_v1_a_pooled_cgroup_that_cannot_take_the_new_limits_is_replaced(tmp_path):
    provider = _pooled_host(tmp_path)
    cgroup = provider.create("t1", Resources())
    _ran(tmp_path, "t1", usec=0, peak=1, charged=0)
    provider.release(cgroup, empty=True)
    (tmp_path / "memory/t1/memory.limit_in_bytes").mkdir()  # the write fails (EBUSY here)
    fresh = provider.create("t2", Resources(memory=64 * 1024 ** 2))
    assert fresh is not cgroup and provider.idle == []
    assert (tmp_path / "memory/t2/memory.limit_in_bytes").read_text() == str(64 * 1024 ** 2)


def test_v1_close_removes_the_pooled_cgroups_and_the_parents(tmp_path):
    provider = _pooled_host(tmp_path)
    cgroup = provider.create("t1", Resources())
    _ran(tmp_path, "t1", usec=0, peak=1, charged=0)
    provider.release(cgroup, empty=True)
    provider.close()
    assert not any((tmp_path / name).exists() for name in ("cpu", "memory", "pids"))

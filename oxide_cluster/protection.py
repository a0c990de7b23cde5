"""The agent's protection from its own tasks: OOM preference, non-dumpable, ``run_as``.

* ``oom_score_adj``: the agent asks for ``AGENT_OOM_SCORE_ADJ`` (lowering needs root or
  ``CAP_SYS_RESOURCE``; without, it keeps what it has) and every task is raised to
  ``TASK_OOM_SCORE_ADJ`` (raising needs no privilege), so when memory runs out the
  kernel's OOM killer picks a task before the agent.
* Non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): a task running as the agent's user can
  neither ptrace the agent nor read ``/proc/<agent>/environ`` or its memory (the secret).
  ``execve`` resets the flag, so tasks stay ordinary processes.
* ``run_as``: when the agent is root, tasks run as this user (its uid, group and
  supplementary groups), through the fork path's ``switchUID`` before exec.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pwd

import attrs
from twisted.logger import Logger

AGENT_OOM_SCORE_ADJ = -900
TASK_OOM_SCORE_ADJ = 500
_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3

log = Logger()


@attrs.frozen
class User:
    """Whom tasks run as."""

    name: str
    uid: int
    gid: int


def resolve_user(name: str | None) -> User | None:
    """The ``run_as`` user, or None when unset or when the agent is not root (it could
    not switch; the log says so). Raises ValueError for an unknown user."""
    if not name:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"run_as: no user {name!r} on this host") from None
    if os.geteuid() != 0:
        log.warn("run_as {user} ignored: the agent is not root, tasks run as its user",
                 user=name)
        return None
    return User(name, entry.pw_uid, entry.pw_gid)


def _prctl(option: int, value: int) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    result = int(libc.prctl(option, value, 0, 0, 0))
    if result < 0:
        raise OSError(ctypes.get_errno(), "prctl failed")
    return result


def set_non_dumpable() -> bool:
    """Make this process non-dumpable; False where the platform cannot."""
    try:
        _prctl(_PR_SET_DUMPABLE, 0)
    except (OSError, AttributeError):
        return False
    return True


def dumpable() -> bool:
    return bool(_prctl(_PR_GET_DUMPABLE, 0))


def set_oom_score_adj(value: int, pid: int | str = "self") -> bool:
    """Write ``/proc/<pid>/oom_score_adj``; False if the kernel refused (no privilege)."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w", encoding="ascii") as handle:
            handle.write(str(value))
    except OSError:
        return False
    return True


def oom_score_adj(pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/oom_score_adj", encoding="ascii") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def protect_agent() -> dict[str, object]:
    """Apply both protections to this process; what holds, for the log and ``/stats``."""
    lowered = set_oom_score_adj(AGENT_OOM_SCORE_ADJ)
    return {"non_dumpable": set_non_dumpable(), "oom_score_adj": oom_score_adj(),
            "oom_score_adj_lowered": lowered, "task_oom_score_adj": TASK_OOM_SCORE_ADJ}

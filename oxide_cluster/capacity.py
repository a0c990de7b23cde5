"""Declared-resource capacity: what a node lets its tasks declare, and what is still free.

A node's allocatable CPUs and memory are the host's less its ``reserve`` (kept for the
agent and the OS). Running tasks take what they declare (``resources``, after the node's
``default_resources``); a task that declares nothing takes a slot and no declared room.
The executor refuses a task that does not fit what is free (429 ``no_free_resources``, the
queue keeps it), the leader places only where it fits, and a task that fits no known node's
allocatable at all is refused at once (422 ``unschedulable``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import psutil

from oxide_cluster.cgroups import Resources, format_size


@attrs.frozen
class Allocatable:
    """CPUs and bytes of memory a node's tasks may declare in all."""

    cpus: float
    memory: int


@attrs.frozen
class Capacity:
    """A node's allocatable and what of it running tasks have not declared."""

    allocatable: Allocatable
    free_cpus: float
    free_memory: int

    def to_stats(self) -> dict[str, Any]:
        """The announce/stats keys (wire version 3)."""
        return {"allocatable_cpus": round(self.allocatable.cpus, 3),
                "allocatable_memory": self.allocatable.memory,
                "free_cpus": round(max(0.0, self.free_cpus), 3),
                "free_memory": max(0, self.free_memory)}

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> Capacity | None:
        """From a node's stats; None when it announced none (an older node)."""
        try:
            return cls(Allocatable(float(stats["allocatable_cpus"]),
                                   int(stats["allocatable_memory"])),
                       float(stats["free_cpus"]), int(stats["free_memory"]))
        except (KeyError, TypeError, ValueError):
            return None


def host_allocatable(reserve: Resources) -> Allocatable:
    """This host's CPUs (those the agent may run on) and memory, less ``reserve``."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    memory = int(psutil.virtual_memory().total)
    return Allocatable(max(0.0, cpus - (reserve.cpus or 0.0)),
                       max(0, memory - (reserve.memory or 0)))


def declared(resources: Mapping[str, Any] | Resources | None) -> tuple[float, int]:
    """(CPUs, bytes) a task takes from its node's room."""
    if resources is None:
        return 0.0, 0
    if isinstance(resources, Mapping):
        resources = Resources.from_json(resources)
    return resources.cpus or 0.0, resources.memory or 0


def taken(tasks: Iterable[Mapping[str, Any] | Resources | None]) -> tuple[float, int]:
    """What a set of tasks declared in all."""
    cpus, memory = 0.0, 0
    for resources in tasks:
        task_cpus, task_memory = declared(resources)
        cpus += task_cpus
        memory += task_memory
    return cpus, memory


def misfit(resources: Resources | None, cpus: float, memory: int) -> str | None:
    """The first declared resource (``cpus``/``memory``) beyond ``cpus``/``memory``."""
    want_cpus, want_memory = declared(resources)
    if want_cpus > cpus + 1e-9:
        return "cpus"
    if want_memory > memory:
        return "memory"
    return None


def describe(resource: str, resources: Resources | None) -> str:
    """``2 CPUs`` / ``4 GiB of memory``: what a task declared, for messages."""
    cpus, memory = declared(resources)
    return f"{cpus:g} CPUs" if resource == "cpus" else f"{format_size(memory)} of memory"

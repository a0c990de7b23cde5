"""The replaceable parts of a node, as ``zope.interface`` interfaces.

A provider package implements one of these and ships an :class:`IOxideProvider` in its own
``twisted/plugins/<name>.py``; ``twisted.plugin.getPlugins`` finds it (``providers.py``)
and the configuration selects it by name. The core never imports a provider module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from zope.interface import Attribute, Interface

if TYPE_CHECKING:  # cluster_queue imports the executor, which imports this module
    from oxide_cluster.cluster_queue import QueueBackend
    from oxide_cluster.model import Task
    from oxide_cluster.suites import SuiteDurations

#: ``(host, port)``: an IPv4 address and discovery port, as membership records peers.
#: A transport that is not UDP maps its own addresses onto such pairs (the demo maps
#: ``127.0.0.1:N`` to a socket file), because the host part is also where peers' HTTP goes.
Address = tuple[str, int]


class IDiscoveryTransport(Interface):
    """Moves discovery datagrams; knows nothing of their content or of membership.

    ``DiscoveryService`` encodes, signs, decodes and keeps the membership table; the
    transport only binds, sends and delivers. Datagrams are at most ``wire.MAX_DATAGRAM``.
    """

    def bind(deliver):
        """Open the socket now (``privilegedStartService``: a taken port stops start-up)
        and call ``deliver(datagram: bytes, sender: Address)`` for each arrival.
        Return the bound discovery port (an ``int``)."""

    def cluster_addresses():  # type: ignore[misc]  # zope interfaces have no self
        """The addresses a datagram "to the whole cluster" is written to, one write each
        (each gets its own encoding: fresh nonces). Empty: unicast to peers only.
        Asked before every announce: keep it cheap."""

    def reaches(address):
        """True if a datagram to the cluster already reaches ``address``, so the service
        need not also unicast to it."""

    def refresh():  # type: ignore[misc]  # zope interfaces have no self
        """Re-read what the cluster addresses depend on (interfaces come and go)."""

    def send(datagram, address):
        """Write one datagram to one address; raise ``OSError`` if it cannot."""

    def close():  # type: ignore[misc]  # zope interfaces have no self
        """Close the socket; return a Deferred that fires when it is closed."""


class DiscoveryTransport(Protocol):
    """:class:`IDiscoveryTransport` for the type checker (mypy does not read zope)."""

    def bind(self, deliver: Callable[[bytes, Address], None]) -> int: ...

    def cluster_addresses(self) -> list[Address]: ...

    def reaches(self, address: Address) -> bool: ...

    def refresh(self) -> None: ...

    def send(self, datagram: bytes, address: Address) -> None: ...

    def close(self) -> defer.Deferred[None]: ...


class IElectionBackend(Interface):
    """A lease store with fencing tokens, which ``RedisElector`` runs leader election on.

    Every method returns a Deferred. A lease is ``key`` -> ``value`` with a ttl; only the
    holder (same ``value``) renews or releases it. Tokens only ever grow.
    """

    def acquire(key, value, ttl_ms):
        """Take the lease if nobody holds it; fires True if taken."""

    def renew(key, value, ttl_ms):
        """Extend our lease; fires False if it is no longer ours."""

    def release(key, value):
        """Give our lease up; fires True if it was ours."""

    def get(key):
        """Fires with the lease's current value, or None."""

    def next_token(key, floor, quiet_ms):
        """Fires ``(token, fresh)``: a fencing token above ``floor`` and every earlier one."""

    def close():  # type: ignore[misc]  # zope interfaces have no self
        """Disconnect; fires when done."""


class ClusterDirectory(Protocol):
    """Each node's unfinished tasks and the lost ones, kept where every node can read them,
    so the leader recovers a dead node's tasks (``directory.TaskDirectory`` on Redis)."""

    def task_changed(self, task: Task) -> None:
        """Executor state listener: record the task while it runs, forget it at its end."""

    def recorded(self, task_id: str) -> defer.Deferred[Any]:
        """Fires once the task's start is written (or that write failed)."""

    async def unfinished(self, node_id: str) -> list[dict[str, Any]]: ...

    async def record_lost(self, record: dict[str, Any]) -> None: ...

    async def record_retried(self, record: dict[str, Any]) -> None: ...

    async def lost(self, task_id: str) -> dict[str, Any] | None: ...


@attrs.frozen
class ClusterState:
    """The durable cluster state an election backend keeps beside its lease: the cluster
    queue (``cluster_queue.QueueBackend``), the task directory and the suites' durations.

    An election provider offers it through ``cluster_state(context)``; ``None`` means
    there is none (``standalone``): tasks queue in the node's own SQLite store.
    ``service``, if any, keeps the stores' connection: ``tap.py`` adds it to the service
    tree right after the node's store, so it opens at start-up and closes after
    everything that uses it.
    """

    queue: QueueBackend
    directory: ClusterDirectory
    suites: SuiteDurations
    service: Service | None = None


class IClusterStateSource(Interface):
    """Optional for an election provider (``providers.Provider`` has it, default None)."""

    def cluster_state(context):
        """The :class:`ClusterState` its backend keeps for the whole cluster, built from
        a ``providers.ProviderContext`` without connecting (connections open lazily), or
        None. Only the leader then dispatches the queue: its elector must elect one
        leader for the cluster, not one per node."""


class ITaskRunner(Interface):
    """Starts a task's process tree, signals it as a whole; its end is reported through
    the process protocol's ``processEnded`` (``executor.TaskRun`` owns everything else)."""

    cgroups = Attribute("The cgroups.CgroupProvider that isolates and limits each task.")

    def spawn(reactor, proto, executable, args, env, path, tty=False,
              cgroup_procs=()):
        """Start the process as the leader of its own process group (on a new
        pseudo-terminal with ``tty``), entering ``cgroup_procs`` before exec; return
        the ``IProcessTransport``."""

    def signal(pid, signum):
        """Send ``signum`` to the whole process group led by ``pid``."""


class TaskRunner(Protocol):
    """:class:`ITaskRunner` for the type checker."""

    cgroups: Any  # cgroups.CgroupProvider (imported lazily there: no import cycle here)

    def spawn(self, reactor: Any, proto: Any, executable: str, args: list[str],
              env: dict[str, str], path: str | None, tty: bool = False,
              cgroup_procs: tuple[str, ...] = ()) -> Any: ...

    def signal(self, pid: int, signum: int) -> None: ...


class IOxideProvider(Interface):
    """A named provider of one kind, found by ``twisted.plugin.getPlugins``.

    Declare one in ``twisted/plugins/<name>.py`` as an object that also provides
    ``twisted.plugin.IPlugin`` (``providers.Provider`` does both).
    """

    kind = Attribute("'discovery_transport', 'election' or 'runner'.")
    name = Attribute("The name the configuration selects it by, e.g. 'multicast'.")
    options = Attribute(
        "A tuple of config.Setting: its own options, given as provider_options "
        "(k=v,... or a YAML mapping) and parsed like every other key.")
    description = Attribute("One line for --help and the start-up error.")

    def factory(context):
        """Build the provider from a ``providers.ProviderContext``: an
        IDiscoveryTransport, an elector service (``election.lease_elector`` around an
        IElectionBackend) or an ITaskRunner. An election provider may also provide
        :class:`IClusterStateSource`: the queue's durable store."""


__all__ = ["Address", "ClusterDirectory", "ClusterState", "DiscoveryTransport",
           "IClusterStateSource", "IDiscoveryTransport", "IElectionBackend",
           "IOxideProvider", "ITaskRunner", "TaskRunner"]

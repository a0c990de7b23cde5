"""The reactor's time as the agent's parts use it (a ``task.Clock`` in tests).

Twisted's ``IReactorTime`` is a zope interface, which mypy cannot check a ``task.Clock``
or a reactor against; these Protocols are its structural form, defined once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.base import DelayedCall


class SecondsClock(Protocol):
    """Only the time: a reactor or a ``task.Clock``."""

    def seconds(self) -> float: ...


class Clock(SecondsClock, Protocol):
    """The time and timers: passes, timeouts and retries run on its schedule."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kw: Any) -> DelayedCall: ...

"""Host load sampled on a timer, so requests read a number and never wait on psutil."""

from __future__ import annotations

import os
from typing import Any

import attrs
import psutil
from twisted.application.internet import TimerService
from twisted.logger import Logger


@attrs.define
class HostLoad:
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)


class StatsSampler(TimerService):
    """Samples CPU %, memory % and load average every ``interval`` seconds."""

    log = Logger()

    def __init__(self, interval: float, reactor: Any = None) -> None:
        super().__init__(interval, self.sample)
        if reactor is not None:
            self.clock = reactor
        self.current = HostLoad()

    def sample(self) -> None:
        # TimerService stops for good if its callable raises: never let it.
        try:
            self.current = HostLoad(
                cpu_percent=psutil.cpu_percent(interval=None),
                memory_percent=psutil.virtual_memory().percent,
                load=os.getloadavg(),
            )
        except Exception:
            self.log.failure("sampling host load failed")

    def cpu_and_memory(self) -> tuple[float, float]:
        return self.current.cpu_percent, self.current.memory_percent

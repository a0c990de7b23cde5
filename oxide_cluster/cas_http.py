"""The site's request class: a ``POST /cas/batch`` body goes straight into the blob cache.

Twisted's ``Request`` spools any body over 100 kB to a temporary file before the handler
runs; for a workspace upload that wrote every byte twice and left the node idle while
the body arrived. Here an authorized batch body is handed to a :class:`BatchSink`
as it arrives (the handler then only waits for it); anything else is spooled as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.web.server import Request

from oxide_cluster.api import ApiRequest
from oxide_cluster.cas import BatchSink

SinkFactory = Callable[[Request, int], "BatchSink | None"]
BATCH_PATH = b"/cas/batch"


class UploadRequest(ApiRequest):
    """``ApiRequest`` whose batch upload bodies stream into the cache."""

    def __init__(self, *args: Any, sinks: SinkFactory | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sinks = sinks

    def gotLength(self, length: int | None) -> None:
        # The request line is known to the channel only at this point (uri comes later).
        channel = self.channel
        command = getattr(channel, "_command", None)
        path = getattr(channel, "_path", b"") or b""
        if self._sinks is not None and length and command == b"POST" \
                and path.split(b"?", 1)[0] == BATCH_PATH:
            sink = self._sinks(self, length)
            if sink is not None:
                self.content = sink
                return
        super().gotLength(length)

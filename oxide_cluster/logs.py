"""Log output: twistd's human-readable text by default, or one JSON object per line.

JSON lines are for log shippers (Docker's json-file/journald → Loki, ELK): every line is
``{"time", "level", "namespace", "system", "message", ...fields}``, so the keyword fields
of ``log.info("task {task_id} ...", task_id=...)`` become searchable keys.

Two ways in, both ending at :func:`json_observer_factory`: ``twistd --logger
oxide_cluster.logs.json_observer_factory oxide-cluster``, or ``log_format: json``
(``OXIDE_LOG_FORMAT=json``, ``--log-format json``), which :func:`use_config` turns into the
same ``--logger`` choice while twistd parses options, before its logging starts.
"""

from __future__ import annotations

import json
import sys
from collections.abc import MutableMapping
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import FileLogObserver, LogEvent, formatEvent
from twisted.python import logfile

# Legacy (twisted.python.log) keys that repeat what the record already says.
_SKIP = frozenset({"message", "format", "isError", "system", "time", "why", "failure"})


def _timestamp(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_as_json(event: LogEvent) -> str:
    """One line of JSON for one event; values JSON cannot hold are written with str()."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _timestamp(event.get("log_time")),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", "-"),
        "system": event.get("log_system", "-"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in _SKIP and key not in record:
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, default=str, ensure_ascii=False) + "\n"


def json_file_observer(output: IO[str]) -> FileLogObserver:
    """An observer writing :func:`event_as_json` lines to ``output``."""
    return FileLogObserver(output, event_as_json)


def json_observer_factory() -> FileLogObserver:
    """For ``twistd --logger``: JSON lines on stdout (containers, systemd's journal)."""
    return json_file_observer(sys.stdout)


# twistd resolves --logger by name and calls it without arguments, so the file
# chosen with --logfile reaches the factory through here.
_logfile_path: str | None = None


def json_logfile_observer_factory() -> FileLogObserver:
    """For ``log_format: json`` with ``--logfile``: JSON lines in that (rotated) file."""
    if _logfile_path is None:
        return json_observer_factory()
    return json_file_observer(logfile.LogFile.fromFullPath(_logfile_path))


def use_config(twistd_options: MutableMapping[str, Any] | None, log_format: str) -> None:
    """Make twistd log JSON when the config asks for it and ``--logger`` was not given.

    Called from the plugin's ``postOptions``, which runs before twistd's own: twistd
    then imports the ``--logger`` name and starts logging with it, after parsing.
    """
    global _logfile_path
    if log_format != "json" or twistd_options is None or twistd_options.get("logger"):
        return
    path = twistd_options.get("logfile")
    if path and path != "-":
        _logfile_path = path
        twistd_options["logger"] = __name__ + ".json_logfile_observer_factory"
    else:
        twistd_options["logger"] = __name__ + ".json_observer_factory"


__all__ = ["event_as_json", "json_file_observer", "json_logfile_observer_factory",
           "json_observer_factory", "use_config"]

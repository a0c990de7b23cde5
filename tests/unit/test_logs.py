"""JSON log lines: one object per event, fields kept, failures as a traceback."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from oxide_cluster.logs import json_file_observer, use_config


def emit(action) -> list[dict]:
    output = io.StringIO()
    publisher = LogPublisher(json_file_observer(output))
    action(Logger(namespace="oxide_cluster.test", observer=publisher))
    lines = output.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_an_event_becomes_one_json_line_with_its_fields():
    [record] = emit(lambda log: log.info("task {task_id} exited {code}", task_id="t1", code=3))
    assert record["message"] == "task t1 exited 3"
    assert record["level"] == "info"
    assert record["namespace"] == "oxide_cluster.test"
    assert record["task_id"] == "t1"
    assert record["code"] == 3
    assert record["time"].endswith("Z")


def test_values_json_cannot_hold_are_written_as_text_and_failures_as_tracebacks():
    def action(log):
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            log.failure("broke on {thing}", Failure(), thing=object(), level=LogLevel.error)
    [record] = emit(action)
    assert record["level"] == "error"
    assert record["thing"].startswith("<object object")
    assert "ZeroDivisionError" in record["traceback"]


def test_config_json_chooses_the_twistd_logger_unless_one_was_given():
    options: dict = {"logger": None, "logfile": None}
    use_config(options, "json")
    assert options["logger"] == "oxide_cluster.logs.json_observer_factory"
    options = {"logger": "my.own.factory", "logfile": None}
    use_config(options, "json")
    assert options["logger"] == "my.own.factory"
    options = {"logger": None, "logfile": None}
    use_config(options, "text")
    assert options["logger"] is None

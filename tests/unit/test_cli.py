"""The CLI's parsing, checks before any request, help text and exit-code table."""

from __future__ import annotations

import argparse

import pytest

from oxide_cluster import cli
from oxide_cluster.client import NodeError
from tests.support import REPO_ROOT, free_port


def help_of(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_readme_exit_code_table_is_the_help_table(capsys):
    readme = (REPO_ROOT / "README.rst").read_text()
    assert cli.exit_codes_rst() in readme
    # The README has one exit-code table: the one rendered from cli.EXIT_CODES.
    assert readme.count("\ncode     meaning\n") == 1
    for argv in ((), ("run",), ("logs",)):
        text = help_of(*argv, capsys=capsys)
        assert cli.exit_codes_text() in text
    codes = [code for code, _ in cli.EXIT_CODES]
    for code in ("2", "65", "67", "69", "70", "74", "75", "77"):
        assert code in codes


def test_help_is_plain_text_and_every_option_has_help(capsys):
    top = cli.parser()
    subparsers = next(action for action in top._actions
                      if isinstance(action, argparse._SubParsersAction))
    for name, sub in [("", top), *subparsers.choices.items()]:
        text = help_of(*([name] if name else []), capsys=capsys)
        assert "``" not in text and ":data:" not in text, name
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name or 'oxide-cluster'} {action.dest} has no help"


@pytest.mark.parametrize("argv", [
    ["--node", "http://n:4000", "--secret", "s", "tasks"],
    ["tasks", "--node", "http://n:4000", "--secret", "s"],
    ["--node", "http://other:1", "tasks", "--node", "http://n:4000", "--secret", "s"],
])
def test_global_options_before_or_after_the_subcommand(argv):
    options = cli.parser().parse_args(argv)
    assert options.node == "http://n:4000"
    assert options.secret == "s"
    assert options.handler is cli.cmd_tasks


def test_run_options_map_to_request_fields(monkeypatch):
    sent = []

    class FakeNode:
        url = "http://n:4000"

        def request(self, method, path, body=None, timeout=None):
            sent.append(body)
            raise NodeError(400, "bad_request", "stop here")

    options = cli.parser().parse_args(["run", "--tty", "--retries", "2", "--node-id", "n2",
                                       "--", "make", "test"])
    with pytest.raises(NodeError):
        cli.cmd_run(FakeNode(), options)  # type: ignore[arg-type]
    assert sent == [{"command": "make", "args": ["test"], "retries": 2, "node": "n2",
                     "tty": True}]


@pytest.mark.parametrize("url", ["localhost:4000", "ci-pool", "ftp://ci-pool:4000"])
def test_node_url_without_scheme_is_a_usage_error(url, capsys, monkeypatch):
    monkeypatch.setenv("OXIDE_CLUSTER_SECRET", "s")
    for argv in (["status", "ID", "--node", url], ["logs", "ID", "--node", url]):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == cli.EXIT_USAGE == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs http://" in err


def test_no_secret_says_where_to_find_it(capsys, monkeypatch):
    monkeypatch.delenv("OXIDE_CLUSTER_SECRET", raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.main(["--node", "http://127.0.0.1:1", "tasks"])
    assert exited.value.code == cli.EXIT_AUTH
    err = capsys.readouterr().err
    assert "no cluster secret" in err and "~/.oxide/secret" in err
    assert "OXIDE_CLUSTER_SECRET" in err and "refused" not in err


def test_unreachable_node_exits_74(capsys, monkeypatch):
    monkeypatch.setenv("OXIDE_CLUSTER_SECRET", "s")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for argv in (["status", "ID"], ["tasks"], ["run", "--", "true"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(["--node", url, *argv])
        assert exited.value.code == cli.EXIT_CONNECTION
        assert "cannot reach" in capsys.readouterr().err


@pytest.mark.parametrize(("status", "code", "exit_code"), [
    (404, "task_not_found", cli.EXIT_NO_TASK),
    (400, "bad_request", cli.EXIT_BAD_REQUEST),
    (401, "unauthorized", cli.EXIT_AUTH),
    (429, "no_capacity", cli.EXIT_UNAVAILABLE),
    (404, "not_found", cli.EXIT_SOFTWARE),
    (500, "internal", cli.EXIT_SOFTWARE),
])
def test_node_errors_map_to_exit_codes(status, code, exit_code):
    assert cli._node_failure(NodeError(status, code, "m")).code == exit_code


def test_a_lost_task_exits_75():
    assert cli.task_exit_code({"state": "lost", "exit_code": None}) == cli.EXIT_LOST == 75


class ScriptedNode:
    """Answers GET /task/ID from a script: NodeErrors are raised, dicts returned."""

    url = "http://n:4000"

    def __init__(self, *answers):
        self.answers = list(answers)

    def request(self, method, path, body=None, timeout=None):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_a_broken_stream_waits_for_the_cluster_to_say_lost(monkeypatch):
    monkeypatch.setattr(cli, "_pause", lambda seconds: None)
    unavailable = NodeError(503, "node_unavailable", "node n2 is not reachable")
    node = ScriptedNode(unavailable, unavailable, {"id": "t-n2", "state": "lost"})
    task = cli.settled_state(node, "t-n2", "owner unreachable")  # type: ignore[arg-type]
    assert task is not None and cli.task_exit_code(task) == cli.EXIT_LOST
    assert node.answers == []


def test_a_broken_stream_of_an_unknown_id_exits_67(monkeypatch):
    node = ScriptedNode(NodeError(404, "task_not_found", "no task 'x' on this node"))
    with pytest.raises(cli.Failed) as failed:
        cli.settled_state(node, "x", "no task")  # type: ignore[arg-type]
    assert failed.value.code == cli.EXIT_NO_TASK


def test_a_running_task_is_followed_again_and_silence_ends_in_74(monkeypatch):
    assert cli.settled_state(ScriptedNode({"state": "running"}), "t", "?") is None  # type: ignore[arg-type]
    monkeypatch.setattr(cli, "_pause", lambda seconds: None)
    node = ScriptedNode(*[NodeError(0, "unreachable", "cannot reach")] * 3)
    with pytest.raises(cli.Failed) as failed:
        cli.settled_state(node, "t", "?", settle_for=0)  # type: ignore[arg-type]
    assert failed.value.code == cli.EXIT_CONNECTION


def test_upload_progress_speaks_every_few_seconds_and_not_for_short_uploads():
    now = [0.0]
    said: list[str] = []
    progress = cli.UploadProgress(said.append, clock=lambda: now[0], every=5.0)
    for second in range(1, 5):  # a four-second upload: silent
        now[0] = float(second)
        progress(second * 2**20, 40 * 2**20)
    assert said == []
    now[0] = 5.0
    progress(10 * 2**20, 40 * 2**20)
    now[0] = 6.0
    progress(12 * 2**20, 40 * 2**20)  # within 5 s of the last line
    now[0] = 10.0
    progress(20 * 2**20, 40 * 2**20)
    assert said == ["workspace upload: 10 of 40 MiB (25 %), 2.0 MiB/s",
                    "workspace upload: 20 of 40 MiB (50 %), 2.0 MiB/s"]


class _Answers:
    """A node whose POST /execute answers are given in advance (a NodeError is raised)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0

    def request(self, method, path, body=None, timeout=None):
        assert (method, path) == ("POST", "/execute")
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_submit_is_sent_again_while_the_cluster_says_it_took_nothing(monkeypatch):
    paused: list[float] = []
    monkeypatch.setattr(cli, "_pause", paused.append)
    said: list[str] = []
    node = _Answers(NodeError(503, "leader_changed", "no longer leads", {"Retry-After": "2"}),
                    NodeError(503, "queue_unavailable", "Redis is unreachable"),
                    {"id": "t1", "state": "running"})
    assert cli.submit(node, {"command": "true"}, said.append) == {"id": "t1",
                                                                  "state": "running"}
    assert node.calls == 3 and paused == [2.0, 1.0]
    assert said[0] == "not taken (leader_changed: no longer leads); submitting again in 2 s"


@pytest.mark.parametrize("code", ["leader_unreachable", "placement_unknown",
                                  "node_unavailable", "draining"])
def test_submit_is_not_sent_again_when_the_task_may_be_running(monkeypatch, code):
    monkeypatch.setattr(cli, "_pause", lambda seconds: None)
    node = _Answers(NodeError(503, code, "it may run"))
    with pytest.raises(NodeError):
        cli.submit(node, {"command": "true"}, lambda line: None)
    assert node.calls == 1


def test_submit_gives_up_after_its_retry_time(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(cli, "_pause", lambda seconds: now.__setitem__(0, now[0] + seconds))
    node = _Answers(*[NodeError(503, "starting", "the node is still starting")] * 20)
    with pytest.raises(NodeError) as raised:
        cli.submit(node, {"command": "true"}, lambda line: None, retry_for=5.0,
                   clock=lambda: now[0])
    assert raised.value.code == "starting"
    assert node.calls == 6  # at 0, 1, 2, 3, 4, 5 s; a pause past 5 s is not taken

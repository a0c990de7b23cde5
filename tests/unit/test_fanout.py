"""``run --parallel``: the split, the shards' environment, whole prefixed lines, the merge."""

from __future__ import annotations

import io
import threading
import xml.etree.ElementTree as ElementTree

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oxide_cluster import cli
from oxide_cluster.fanout import (
    MAX_LINE,
    Shard,
    ShardOutput,
    expand_globs,
    first_failure,
    merge_junit,
    shard_env,
    split_by_size,
    substitute,
)
from oxide_cluster.workspace_client import junit_summary

# -- split ------------------------------------------------------------------------------


def test_split_balances_sizes_largest_first():
    sizes = {"a": 9, "b": 7, "c": 6, "d": 5, "e": 4, "f": 1}
    parts = split_by_size(sizes, 3)
    # a(9) b(7) c(6), then d(5) on c, e(4) on b, f(1) on a: loads 10, 11, 11.
    assert parts == [["a", "f"], ["b", "e"], ["c", "d"]]


def test_split_is_deterministic_whatever_the_order_of_the_input():
    sizes = {f"tests/test_{i}.py": (i * 37) % 11 for i in range(40)}
    backwards = dict(reversed(list(sizes.items())))
    assert split_by_size(sizes, 4) == split_by_size(backwards, 4)


def test_split_with_fewer_files_than_shards_gives_no_empty_shard():
    assert split_by_size({"x": 1, "y": 2}, 4) == [["y"], ["x"]]
    assert split_by_size({}, 3) == []


def test_split_into_no_shards_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        split_by_size({"x": 1}, 0)


@given(st.dictionaries(st.text("abc/._", min_size=1, max_size=8), st.integers(0, 10_000),
                       max_size=60),
       st.integers(1, 8))
def test_every_file_lands_in_exactly_one_nonempty_shard_within_the_lpt_bound(sizes, shards):
    parts = split_by_size(sizes, shards)
    placed = [name for part in parts for name in part]
    assert sorted(placed) == sorted(sizes)
    assert len(parts) == min(shards, len(sizes))
    assert all(parts)
    if sizes:
        loads = [sum(sizes[name] for name in part) for part in parts]
        # Greedy LPT: the heaviest part exceeds the mean by at most one file.
        assert max(loads) <= sum(loads) / len(parts) + max(sizes.values())


def test_globs_select_relative_paths_of_the_workspace():
    paths = ["tests/a.txt", "tests/b.py", "tests/sub/c.txt", "docs/d.txt"]
    assert expand_globs(paths, ["tests/*.txt"]) == ["tests/a.txt"]
    assert expand_globs(paths, ["tests/**/*.txt", "tests/*.txt"]) == \
        ["tests/a.txt", "tests/sub/c.txt"]
    with pytest.raises(ValueError, match="--split glob"):
        expand_globs(paths, ["../*.txt"])


def test_files_replace_the_placeholder_as_arguments_or_quoted_inside_one():
    files = ["tests/a b.py", "tests/c.py"]
    assert substitute(["pytest", "-q", "{files}"], files) == \
        ["pytest", "-q", "tests/a b.py", "tests/c.py"]
    assert substitute(["sh", "-c", "pytest {files}"], files) == \
        ["sh", "-c", "pytest 'tests/a b.py' tests/c.py"]


# -- environment and exit code -----------------------------------------------------------


def test_each_shard_gets_its_index_and_the_total_under_every_ci_name():
    envs = [shard_env(index, 3) for index in range(3)]
    assert envs[1] == {"OXIDE_SHARD_INDEX": "1", "OXIDE_SHARD_TOTAL": "3",
                       "CI_NODE_INDEX": "2", "CI_NODE_TOTAL": "3",
                       "BUILDKITE_PARALLEL_JOB": "1", "BUILDKITE_PARALLEL_JOB_COUNT": "3"}
    for name in envs[0]:
        assert len({env[name] for env in envs}) == (1 if name.endswith(("TOTAL", "COUNT"))
                                                     else 3), name


def test_the_exit_code_is_the_lowest_numbered_failing_shards():
    shards = [Shard(0, 3, [], code=0), Shard(1, 3, [], code=3), Shard(2, 3, [], code=75)]
    failed = first_failure(shards)
    assert failed is not None and (failed.label, failed.code) == ("2/3", 3)
    assert first_failure([Shard(0, 1, [], code=0)]) is None


def test_parallel_options_without_parallel_are_a_usage_error():
    options = cli.parser().parse_args(["run", "--split", "*.py", "--", "pytest", "{files}"])
    with pytest.raises(cli.Failed) as failure:
        cli.cmd_run(cli.Node("http://127.0.0.1:9", "s"), options)
    assert failure.value.code == cli.EXIT_USAGE
    assert "need --parallel" in str(failure.value)


# -- output ------------------------------------------------------------------------------


def test_lines_of_two_shards_never_mix_and_each_has_its_prefix():
    target, lock = io.BytesIO(), threading.Lock()
    one, two = ShardOutput(target, b"[1/2] ", lock), ShardOutput(target, b"[2/2] ", lock)
    one.write(b"alpha be")
    two.write(b"gamma\ndel")
    one.write(b"ta\nfirst")
    two.write(b"ta\n")
    one.close()
    two.close()
    assert target.getvalue() == b"[2/2] gamma\n[1/2] alpha beta\n[2/2] delta\n[1/2] first\n"


def test_a_line_longer_than_the_limit_is_cut_rather_than_held():
    target = io.BytesIO()
    output = ShardOutput(target, b"> ", threading.Lock())
    output.write(b"x" * (MAX_LINE + 1))
    assert target.getvalue() == b"> " + b"x" * (MAX_LINE + 1) + b"\n"


# -- JUnit -------------------------------------------------------------------------------


def suite(name: str, passed: int, failed: int = 0, skipped: int = 0, time: float = 1.0
          ) -> bytes:
    cases = "".join(f'<testcase name="p{i}"/>' for i in range(passed))
    cases += "".join(f'<testcase name="f{i}"><failure/></testcase>' for i in range(failed))
    cases += "".join(f'<testcase name="s{i}"><skipped/></testcase>' for i in range(skipped))
    return f'<testsuite name="{name}" time="{time}">{cases}</testsuite>'.encode()


def test_merged_report_sums_the_shards_and_says_which_shard_ran_each_suite():
    shard1 = [suite("a", 3, failed=1, time=2.0), b"<html>not junit</html>"]
    shard2 = [b'<testsuites><testsuite name="b" tests="2" failures="0" errors="1" '
              b'skipped="0" time="0.5"><testcase name="x"/><testcase name="y"><error/>'
              b'</testcase></testsuite></testsuites>', suite("c", 1, skipped=2, time=0.25)]
    shard3: list[bytes] = []
    merged = merge_junit([shard1, shard2, shard3])

    assert [(s.tests, s.failures, s.errors, s.skipped) for s in merged.per_shard] == \
        [(4, 1, 0, 0), (5, 0, 1, 2), (0, 0, 0, 0)]
    assert (merged.total.tests, merged.total.failures, merged.total.errors,
            merged.total.skipped) == (9, 1, 1, 2)
    assert merged.total.time == pytest.approx(2.75)
    assert junit_summary(merged.document) == merged.total
    root = ElementTree.fromstring(merged.document)
    shards = {s.get("name"): s.find("properties/property[@name='oxide.shard']").get("value")
              for s in root.findall("testsuite")}
    assert shards == {"a": "1/3", "b": "2/3", "c": "2/3"}
    assert root.find("testsuite[@name='a']").get("tests") == "4"


def test_a_report_with_a_doctype_is_not_merged():
    evil = b'<!DOCTYPE x [<!ENTITY e "boom">]><testsuite tests="99"/>'
    merged = merge_junit([[evil, suite("ok", 1)]])
    assert merged.total.tests == 1


def test_empty_files_still_fill_every_shard():
    # Found by hypothesis: two empty files once both landed on the first shard.
    assert split_by_size({"_": 0, "__": 0}, 2) == [["_"], ["__"]]

"""Hypothesis strategies for hostile input, shared by the unit and HTTP fuzz tests."""

from __future__ import annotations

from hypothesis import strategies as st

# JSON values, strings with any code point (lone surrogates included: JSON allows them).
ANY_TEXT = st.text(st.characters() | st.integers(0xD800, 0xDFFF).map(chr)
                   | st.sampled_from("\x00=/"), max_size=30)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(ANY_TEXT, children, max_size=4),
    max_leaves=20,
)

TASK_FIELDS = st.sampled_from(["command", "args", "cwd", "env", "secret_env", "timeout",
                               "idle_timeout", "labels", "node", "retries", "fanout",
                               "bogus"])
TEXT_MAP = st.dictionaries(ANY_TEXT, ANY_TEXT, max_size=3)
# Nearly valid bodies: right types, hostile text (lone surrogates, NUL, '=', empty).
PLAUSIBLE_BODIES = st.fixed_dictionaries({"command": ANY_TEXT}, optional={
    "args": st.lists(ANY_TEXT, max_size=3), "cwd": ANY_TEXT.map(lambda t: "/" + t),
    "env": TEXT_MAP, "secret_env": TEXT_MAP, "labels": TEXT_MAP, "node": ANY_TEXT,
    "timeout": st.floats(), "idle_timeout": st.floats(), "retries": st.integers(),
    "fanout": st.fixed_dictionaries({
        "run": ANY_TEXT, "index": st.integers(), "total": st.integers(),
        "mode": ANY_TEXT | st.sampled_from(["shards", "queue"])})})

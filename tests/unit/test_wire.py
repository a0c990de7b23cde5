"""The discovery datagram codec: what it accepts, and the precise reason for what it refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from oxide_cluster import wire
from oxide_cluster.wire import Codec, ReplayGuard, WireError

KEY = wire.derive_key("s3cret")
NOW = 1_700_000_000.0


def announce_body(node_id: str = "node-a", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "node_id": node_id,
        "hostname": "host-a",
        "api_port": 8080,
        "services": ["executor", "api"],
        "labels": {"os": "linux"},
        "version": "0.1.0",
        "started_at": NOW - 100.0,
        "stats": {
            "cpu_percent": 12.5,
            "memory_percent": 40.0,
            "load": [0.5, 0.25, 0.125],
            "running_tasks": 1,
            "free_slots": 3,
        },
        "leader": {"node_id": "node-b", "token": 7, "since": "2024-01-01T00:00:01Z"},
    }
    body.update(overrides)
    return body


def make_clock(now: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(now)
    return clock


def guard(now: float = NOW) -> ReplayGuard:
    return ReplayGuard(make_clock(now), window=5.0)


def valid_datagram(ts: float = NOW, nonce: str | None = None) -> bytes:
    return wire.encode(KEY, wire.ANNOUNCE, "node-a", announce_body(), ts=ts, nonce=nonce)


def resign(obj: dict[str, Any], key: bytes = KEY) -> bytes:
    """Re-sign a tampered envelope so that only the field under test is wrong."""
    obj = {k: v for k, v in obj.items() if k != "mac"}
    obj["mac"] = wire._mac(key, obj)
    return wire.canonical(obj)


def reason_of(data: bytes, g: ReplayGuard | None = None) -> str:
    with pytest.raises(WireError) as info:
        wire.decode(KEY, data, g if g is not None else guard())
    return info.value.reason


def test_round_trip_every_type() -> None:
    g = guard()
    for type_, body in [
        (wire.ANNOUNCE, announce_body()),
        (wire.QUERY, {}),
        (wire.LEAVE, {}),
        (wire.LEAVE, {"reason": "shutdown"}),
    ]:
        msg = wire.decode(KEY, wire.encode(KEY, type_, "node-a", body, ts=NOW), g)
        assert (msg.type, msg.node_id, msg.ts, msg.body) == (type_, "node-a", NOW, body)


def test_datagram_is_canonical_json_with_contract_fields() -> None:
    data = valid_datagram(nonce="00112233445566778899aabbccddeeff")
    obj = json.loads(data)
    assert set(obj) == {"v", "type", "node_id", "ts", "nonce", "body", "mac"}
    assert obj["v"] == 1 and obj["ts"] == NOW
    assert data == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert len(obj["mac"]) == 64


@pytest.mark.parametrize(
    "overrides",
    [
        {"leader": None},
        {"leader": {"node_id": None, "token": None, "since": None}},
        {"leader": {"node_id": "b", "token": "7", "since": "2024-01-01T00:00:00Z"}},
        {"stats": {**announce_body()["stats"], "load": 0.5}},
        {"stats": {**announce_body()["stats"], "draining": True}},
    ],
)
def test_announce_accepts_every_documented_shape(overrides: dict[str, Any]) -> None:
    data = wire.encode(KEY, wire.ANNOUNCE, "node-a", announce_body(**overrides), ts=NOW)
    assert wire.decode(KEY, data, guard()).body == announce_body(**overrides)


def test_forged_mac_is_refused() -> None:
    obj = json.loads(valid_datagram())
    obj["body"]["api_port"] = 9999
    assert reason_of(wire.canonical(obj)) == "bad_mac"


def test_wrong_secret_is_refused() -> None:
    data = wire.encode(wire.derive_key("other"), wire.QUERY, "node-a", {}, ts=NOW)
    assert reason_of(data) == "bad_mac"


def test_key_is_derived_not_the_raw_secret() -> None:
    assert wire.derive_key("s3cret") != b"s3cret"
    with pytest.raises(ValueError):
        wire.derive_key("")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe garbage", "not_json"),
        (b"{not json", "not_json"),
        (b"[1,2,3]", "not_json"),
        (b'{"v":NaN}', "not_json"),
        (b'{"v":1e999}', "not_json"),
        (b'{"v":1,"v":1}', "not_json"),
        (b"{}", "bad_version"),
        (b'{"v":4}', "bad_version"),
        (b'{"v":true}', "bad_version"),
        (b'{"v":1}', "bad_field"),
        (b" " * 1201, "oversized"),
    ],
)
def test_malformed_datagrams_have_precise_reasons(data: bytes, reason: str) -> None:
    assert reason_of(data) == reason


def test_signed_but_invalid_fields_are_bad_field() -> None:
    base = json.loads(valid_datagram())
    cases: list[tuple[str, Any]] = [
        ("api_port", 70000),
        ("api_port", True),
        ("hostname", 5),
        ("services", "api"),
        ("labels", {"k": 1}),
        ("started_at", "yesterday"),
        ("stats", {**base["body"]["stats"], "load": [1, 2, 3, 4]}),
        ("leader", {"node_id": "x", "token": 1, "since": "2024-01-01T00:00:00"}),
        ("node_id", "someone-else"),
        ("stats", {"cpu_percent": 1}),
        ("leader", {"node_id": "x"}),
        ("extra", 1),
    ]
    for field, value in cases:
        obj = json.loads(json.dumps(base))
        obj["body"][field] = value
        assert reason_of(resign(obj)) == "bad_field", field


def test_signed_unknown_type_is_refused() -> None:
    obj = json.loads(valid_datagram())
    obj["type"] = "stats"
    assert reason_of(resign(obj)) == "unknown_type"


def test_stale_and_future_timestamps_are_refused() -> None:
    assert reason_of(valid_datagram(ts=NOW - 5.5)) == "stale"
    assert reason_of(valid_datagram(ts=NOW + 5.5)) == "future"
    wire.decode(KEY, valid_datagram(ts=NOW - 4.9), guard())
    wire.decode(KEY, valid_datagram(ts=NOW + 4.9), guard())


def test_replayed_nonce_is_refused() -> None:
    g = guard()
    data = valid_datagram()
    wire.decode(KEY, data, g)
    assert reason_of(data, g) == "replayed"


def test_guard_forgets_nonces_once_they_would_be_stale_anyway() -> None:
    clock = make_clock()
    g = ReplayGuard(clock, window=5.0)
    for i in range(100):
        g.check(NOW, f"{i:016x}")
    assert len(g) == 100
    clock.advance(5.1)
    g.check(clock.seconds(), "f" * 16)
    assert len(g) == 1


def test_guard_memory_is_bounded() -> None:
    g = ReplayGuard(make_clock(), window=5.0, max_nonces=10)
    for i in range(50):
        g.check(NOW, f"{i:016x}")
    assert len(g) == 10


def test_encoder_refuses_oversized_datagrams() -> None:
    labels = {f"label{i}": "x" * 100 for i in range(20)}
    with pytest.raises(WireError) as info:
        wire.encode(KEY, wire.ANNOUNCE, "node-a", announce_body(labels=labels), ts=NOW)
    assert info.value.reason == "oversized"


def test_encoder_refuses_what_peers_would_refuse() -> None:
    with pytest.raises(WireError) as info:
        wire.encode(KEY, wire.ANNOUNCE, "node-a", announce_body(api_port="80"), ts=NOW)
    assert info.value.reason == "bad_field"
    with pytest.raises(WireError):
        wire.encode(KEY, "stats", "node-a", {}, ts=NOW)


def test_typical_announce_leaves_headroom() -> None:
    assert len(valid_datagram()) < 700


def test_codec_stamps_wall_time_from_injected_callable() -> None:
    clock = make_clock()
    codec = Codec.from_secret("s3cret", clock, wall=lambda: NOW + 1.0)
    msg = codec.decode(codec.encode(wire.QUERY, "node-a", {}))
    assert msg.ts == NOW + 1.0


def test_wire_error_refuses_unknown_reason() -> None:
    with pytest.raises(ValueError):
        WireError("whatever", "")


# -- properties ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1400))
def test_random_bytes_only_ever_raise_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        wire.decode(KEY, data, guard())


@st.composite
def mutated_datagrams(draw: st.DrawFn) -> bytes:
    data = bytearray(valid_datagram(nonce="0123456789abcdef"))
    action = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
    if action == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    pos = draw(st.integers(0, len(data) - 1))
    if action == "flip":
        data[pos] ^= draw(st.integers(1, 255))
    elif action == "insert":
        data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    else:
        del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


@settings(max_examples=500, deadline=None)
@given(mutated_datagrams())
def test_mutated_datagrams_only_ever_raise_wire_error(data: bytes) -> None:
    try:
        msg = wire.decode(KEY, data, guard())
    except WireError:
        return
    # Whitespace-only edits keep the canonical form, hence the MAC: same message.
    assert msg == wire.decode(KEY, valid_datagram(nonce="0123456789abcdef"), guard())


# -- version 2: gossiped members -------------------------------------------------------


def entry(node_id: str = "node-c", **overrides: Any) -> dict[str, Any]:
    return {"node_id": node_id, "ip": "10.0.0.3", "api_port": 4010, "discovery_port": 4011,
            **overrides}


def test_announce_with_members_is_version_2_and_decodes_them() -> None:
    body = {**announce_body(), "members": [entry("node-c"), entry("node-d", ip="10.0.0.4")]}
    data = wire.encode(KEY, wire.ANNOUNCE, "node-a", body, ts=NOW)
    assert json.loads(data)["v"] == 2
    msg = wire.decode(KEY, data, guard())
    assert msg.version == 2 and msg.dropped_members == 0
    assert msg.members == (wire.Member("node-c", "10.0.0.3", 4010, 4011),
                           wire.Member("node-d", "10.0.0.4", 4010, 4011))
    assert msg.body == announce_body()  # the rest is the version-1 announce, unchanged


def test_without_members_datagrams_stay_version_1_for_old_nodes() -> None:
    for type_, body in [(wire.ANNOUNCE, announce_body()), (wire.QUERY, {}), (wire.LEAVE, {})]:
        obj = json.loads(wire.encode(KEY, type_, "node-a", body, ts=NOW))
        assert obj["v"] == 1 and obj["body"] == body


def test_members_belong_to_version_2_only() -> None:
    v1 = json.loads(valid_datagram())
    v1["body"]["members"] = [entry()]
    assert reason_of(resign(v1)) == "bad_field"
    v2 = json.loads(valid_datagram())
    v2["v"] = 2
    assert reason_of(resign(v2)) == "bad_field"  # a version-2 announce names its members
    v2["body"]["members"] = []
    assert wire.decode(KEY, resign(v2), guard()).members == ()


def with_members(members: Any) -> bytes:
    obj = json.loads(valid_datagram())
    obj["v"] = 2
    obj["body"]["members"] = members
    return resign(obj)


@pytest.mark.parametrize("members", [
    "node-c", {"node_id": "node-c"}, None, 3,
    [0] * (wire.MAX_MEMBERS + 1),  # too long: refused before any entry is looked at
])
def test_a_malformed_member_list_refuses_the_datagram(members: Any) -> None:
    assert reason_of(with_members(members)) == "bad_field"


BAD_ENTRIES = [
    "node-c", None, [1, 2], entry(api_port="4010"), entry(api_port=True), entry(api_port=0),
    entry(api_port=65536), entry(discovery_port=-1), entry(discovery_port=4011.0),
    entry(ip="localhost"), entry(ip="10.0.0"), entry(ip="0.0.0.0"),
    entry(ip="255.255.255.255"), entry(ip="224.0.0.1"), entry(ip="::1"), entry(ip=7),
    entry(node_id=""), entry(node_id="x" * 129), entry(node_id=5), entry(extra=1),
    {k: v for k, v in entry().items() if k != "ip"},
]


def test_bad_member_entries_are_dropped_and_counted_the_rest_kept() -> None:
    good = [entry("node-c"), entry("node-d")]
    for bad in BAD_ENTRIES:
        msg = wire.decode(KEY, with_members([good[0], bad, good[1]]), guard())
        assert msg.dropped_members == 1, bad
        assert [m.node_id for m in msg.members] == ["node-c", "node-d"], bad
    assert wire.decode(KEY, with_members(BAD_ENTRIES[:8]), guard()).dropped_members == 8


def test_encode_never_emits_a_bad_member() -> None:
    for bad in BAD_ENTRIES:
        with pytest.raises(WireError):
            wire.encode(KEY, wire.ANNOUNCE, "node-a",
                        {**announce_body(), "members": [bad]}, ts=NOW)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(sorted(entry()) + ["x"]), inner,
                                      max_size=5), max_leaves=20))
def test_any_member_list_is_accepted_or_refused_never_crashes(members: Any) -> None:
    data = with_members(members)
    if len(data) > wire.MAX_DATAGRAM:
        return
    try:
        msg = wire.decode(KEY, data, guard())
    except WireError:
        return
    assert len(msg.members) + msg.dropped_members == len(members)


def test_draining_must_be_a_boolean_and_nothing_else_is_optional() -> None:
    for stats in ({**announce_body()["stats"], "draining": "yes"},
                  {**announce_body()["stats"], "paused": True}):
        with pytest.raises(WireError) as info:
            wire.encode(KEY, wire.ANNOUNCE, "node-a", announce_body(stats=stats), ts=NOW)
        assert info.value.reason == "bad_field"


# -- version 3: declared-resource capacity ---------------------------------------------

CAPACITY = {"allocatable_cpus": 3.5, "allocatable_memory": 7 * 2**30, "free_cpus": 1.5,
            "free_memory": 2**30}


def test_announce_with_capacity_is_version_3_and_decodes_it() -> None:
    body = announce_body()
    body["stats"] = {**body["stats"], **CAPACITY}
    data = wire.encode(KEY, wire.ANNOUNCE, "node-a", body, ts=NOW)
    assert json.loads(data)["v"] == 3
    msg = wire.decode(KEY, data, guard())
    assert msg.version == 3 and msg.body["stats"]["free_memory"] == 2**30
    with_gossip = {**body, "members": [entry()]}
    msg = wire.decode(KEY, wire.encode(KEY, wire.ANNOUNCE, "node-a", with_gossip, ts=NOW),
                      guard())
    assert msg.version == 3 and len(msg.members) == 1


def test_capacity_belongs_to_version_3_and_comes_whole() -> None:
    older = json.loads(valid_datagram())
    older["body"]["stats"].update(CAPACITY)
    assert reason_of(resign(older)) == "bad_field"  # a version-1 node never sends it
    older["v"] = 2
    older["body"]["members"] = []
    assert reason_of(resign(older)) == "bad_field"
    partial = announce_body()
    partial["stats"] = {**partial["stats"], "free_cpus": 1.0}
    with pytest.raises(WireError) as refused:
        wire.encode(KEY, wire.ANNOUNCE, "node-a", partial, ts=NOW)
    assert refused.value.reason == "bad_field"
    negative = announce_body()
    negative["stats"] = {**negative["stats"], **CAPACITY, "free_memory": -1}
    with pytest.raises(WireError, match="free_memory"):
        wire.encode(KEY, wire.ANNOUNCE, "node-a", negative, ts=NOW)

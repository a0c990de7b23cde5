"""The one encoder/decoder of discovery datagrams (contract, versions 1, 2 and 3).

A datagram is canonical JSON::

    {"v":1,"type":...,"node_id":...,"ts":<unix float>,"nonce":...,"body":{...},"mac":...}

``mac`` is hex HMAC-SHA256, keyed by ``derive_key(secret)``, over the canonical JSON
(sorted keys, no spaces, ASCII) of every other field. Types are ``announce``, ``query`` and
``leave``. Stats are merged into ``announce`` (there is no separate ``stats`` type): one
datagram per interval carries identity and load, so a receiver never knows a peer without
fresh numbers for it.

Times in a body are unix seconds like ``ts`` (``started_at``; ``leader.since`` may also be
an RFC 3339 string); ``stats.load`` is the 1/5/15-minute load average list or one number;
``leader`` is the sender's view of the leader (``{"node_id","token","since"}``) or null.

Both sides go through this module: ``encode`` validates what it produces with the same
rules ``decode`` applies, so a node cannot emit a datagram its peers would reject.

Version 2 adds one thing: an ``announce`` may carry ``members``, the peers the sender hears
itself (gossip), as at most ``MAX_MEMBERS`` objects ``{"node_id","ip","api_port",
"discovery_port"}``. Every other field is unchanged. ``encode`` writes ``v`` 2 only for an
announce that carries ``members`` (unicast announces), so broadcasts, queries and leaves
stay version 1 and a version-1 node still understands them; ``decode`` accepts both. A
malformed ``members`` list (not a list, too long) refuses the datagram; a malformed entry
is dropped and counted in ``Message.dropped_members``, and the rest of the announce is kept.

Version 3 adds the node's declared-resource capacity to an announce's ``stats``: all four of
``allocatable_cpus``, ``allocatable_memory`` (bytes), ``free_cpus`` and ``free_memory``
(allocatable less what running tasks declared), so a leader packs tasks by the resources
they declare. ``members`` is optional in a version-3 announce. ``encode`` writes ``v`` 3
only for an announce whose stats carry them; a version-1 or 2 datagram carrying them is
refused. A version-2 node refuses version-3 announces (``bad_version``), so during a
rolling upgrade the old nodes stop hearing the upgraded ones until they are upgraded too;
an upgraded node reads the older versions and treats a peer that announces no capacity as
able to fit any task (that node's own admission is the final word).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import json
import math
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

import attrs

from oxide_cluster.clock import SecondsClock

VERSION: Final = 3
#: Versions ``decode`` accepts; 1 is every field of 2 but ``members``; 3 adds capacity.
VERSIONS: Final = (1, 2, 3)
#: Upper bound on gossiped members per datagram (``MAX_DATAGRAM`` usually binds first).
MAX_MEMBERS: Final = 16
MAX_DATAGRAM: Final = 1200
KEY_CONTEXT: Final = b"oxide-cluster/discovery/v1"

ANNOUNCE: Final = "announce"
QUERY: Final = "query"
LEAVE: Final = "leave"
TYPES: Final = (ANNOUNCE, QUERY, LEAVE)

#: Every reason a datagram can be refused; counters and logs use exactly these.
REASONS: Final = (
    "oversized",
    "not_json",
    "bad_version",
    "bad_field",
    "bad_mac",
    "unknown_type",
    "stale",
    "future",
    "replayed",
)

_ENVELOPE_KEYS = frozenset({"v", "type", "node_id", "ts", "nonce", "body", "mac"})
_STATS_KEYS = frozenset({"cpu_percent", "memory_percent", "load", "running_tasks", "free_slots"})
# Sent only while true, so a node that is not draining stays readable by older peers.
_STATS_OPTIONAL = frozenset({"draining"})
#: Declared-resource capacity (version 3): all four or none.
CAPACITY_KEYS: Final = frozenset({"allocatable_cpus", "allocatable_memory", "free_cpus",
                                  "free_memory"})
_LEADER_KEYS = frozenset({"node_id", "token", "since"})
_ANNOUNCE_KEYS = frozenset(
    {
        "node_id",
        "hostname",
        "api_port",
        "services",
        "labels",
        "version",
        "started_at",
        "stats",
        "leader",
    }
)
_ANNOUNCE_V2_KEYS = _ANNOUNCE_KEYS | {"members"}
_MEMBER_KEYS = frozenset({"node_id", "ip", "api_port", "discovery_port"})
_HEX = frozenset("0123456789abcdef")



class WireError(Exception):
    """A datagram was refused; ``reason`` is one of ``REASONS`` (for counters)."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown wire error reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@attrs.frozen
class Member:
    """One gossiped peer: who it is and where its API and discovery socket are."""

    node_id: str
    ip: str
    api_port: int
    discovery_port: int

    def to_json(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "ip": self.ip, "api_port": self.api_port,
                "discovery_port": self.discovery_port}


@attrs.frozen
class Message:
    """A decoded, authenticated datagram; ``body`` never holds ``members``."""

    type: str
    node_id: str
    ts: float
    nonce: str
    body: dict[str, Any]
    version: int = 1
    members: tuple[Member, ...] = ()
    #: Gossip entries that failed validation and were left out of ``members``.
    dropped_members: int = 0


def derive_key(secret: str | bytes) -> bytes:
    """Derive the discovery key, so the raw cluster secret never keys two protocols."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    if not raw:
        raise ValueError("the cluster secret must not be empty")
    return hmac.new(raw, KEY_CONTEXT, hashlib.sha256).digest()


def canonical(obj: Any) -> bytes:
    """Canonical JSON: the bytes the MAC covers and the bytes we send."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _mac(key: bytes, envelope: dict[str, Any]) -> str:
    unsigned = {k: v for k, v in envelope.items() if k != "mac"}
    return hmac.new(key, canonical(unsigned), hashlib.sha256).hexdigest()


# -- field validation (shared by encode and decode) -------------------------------------


def _bad(detail: str) -> WireError:
    return WireError("bad_field", detail)


def _check_str(value: Any, name: str, max_len: int, min_len: int = 0) -> str:
    if not isinstance(value, str) or not min_len <= len(value) <= max_len:
        raise _bad(f"{name} must be a string of {min_len}..{max_len} characters")
    return value


def _check_int(value: Any, name: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _bad(f"{name} must be an integer in {lo}..{hi}")
    return value


def _check_number(value: Any, name: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _bad(f"{name} must be a finite number")
    return float(value)


def _check_keys(value: Any, name: str, required: frozenset[str],
                optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{name} must be an object")
    if not required <= value.keys() <= required | optional:
        missing = sorted(required - value.keys())
        extra = sorted(value.keys() - required - optional)
        raise _bad(f"{name} keys: missing {missing}, unexpected {extra}")
    return value


def _check_timestamp(value: Any, name: str) -> None:
    _check_str(value, name, 64, 1)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _bad(f"{name} must be an RFC 3339 timestamp") from None
    if parsed.tzinfo is None:
        raise _bad(f"{name} must carry a UTC offset")


def parse_member(entry: Any) -> Member:
    """One gossip entry, validated field by field; raises ``WireError`` (bad_field)."""
    _check_keys(entry, "members[]", _MEMBER_KEYS)
    node_id = _check_str(entry["node_id"], "members[].node_id", 128, 1)
    ip = _check_str(entry["ip"], "members[].ip", 15, 7)
    try:
        address = ipaddress.IPv4Address(ip)
    except ValueError:
        raise _bad("members[].ip must be a dotted IPv4 address") from None
    if address.is_unspecified or address.is_multicast or str(address) != ip \
            or address == ipaddress.IPv4Address("255.255.255.255"):
        raise _bad("members[].ip must be a unicast IPv4 address")
    api_port = _check_int(entry["api_port"], "members[].api_port", 1, 65535)
    discovery_port = _check_int(entry["discovery_port"], "members[].discovery_port", 1, 65535)
    return Member(node_id, ip, api_port, discovery_port)


def _check_members(value: Any) -> list[Any]:
    if not isinstance(value, list) or len(value) > MAX_MEMBERS:
        raise _bad(f"members must be a list of at most {MAX_MEMBERS} entries")
    return value


def _check_announce(node_id: str, body: dict[str, Any], version: int) -> None:
    if version >= 3:
        _check_keys(body, "body", _ANNOUNCE_KEYS, frozenset({"members"}))
    else:
        _check_keys(body, "body", _ANNOUNCE_V2_KEYS if version >= 2 else _ANNOUNCE_KEYS)
    if "members" in body:
        _check_members(body["members"])
    if body["node_id"] != node_id:
        raise _bad("body.node_id differs from node_id")
    _check_str(body["hostname"], "hostname", 253)
    _check_int(body["api_port"], "api_port", 0, 65535)
    services = body["services"]
    if not isinstance(services, list) or len(services) > 32:
        raise _bad("services must be a list of at most 32 strings")
    for service in services:
        _check_str(service, "services[]", 64, 1)
    labels = body["labels"]
    if not isinstance(labels, dict) or len(labels) > 32:
        raise _bad("labels must be an object of at most 32 entries")
    for key, value in labels.items():
        _check_str(key, "labels key", 64, 1)
        _check_str(value, f"labels[{key}]", 128)
    _check_str(body["version"], "version", 64)
    _check_number(body["started_at"], "started_at")
    if version >= 3:
        stats = _check_keys(body["stats"], "stats", _STATS_KEYS | CAPACITY_KEYS,
                            _STATS_OPTIONAL)
        for key in ("allocatable_cpus", "free_cpus"):
            _check_number(stats[key], f"stats.{key}")
            if not 0 <= stats[key] <= 1_000_000:
                raise _bad(f"stats.{key} must be from 0 to 1000000")
        for key in ("allocatable_memory", "free_memory"):
            _check_int(stats[key], f"stats.{key}", 0, 2 ** 62)
    else:
        stats = _check_keys(body["stats"], "stats", _STATS_KEYS, _STATS_OPTIONAL)
    if "draining" in stats and not isinstance(stats["draining"], bool):
        raise _bad("stats.draining must be true or false")
    for key in ("cpu_percent", "memory_percent"):
        _check_number(stats[key], f"stats.{key}")
    load = stats["load"]
    if isinstance(load, list):
        if not 1 <= len(load) <= 3:
            raise _bad("stats.load must be a number or a list of 1..3 numbers")
        for value in load:
            _check_number(value, "stats.load[]")
    else:
        _check_number(load, "stats.load")
    for key in ("running_tasks", "free_slots"):
        _check_int(stats[key], f"stats.{key}", 0, 1_000_000)
    leader = body["leader"]
    if leader is not None:
        _check_keys(leader, "leader", _LEADER_KEYS)
        if leader["node_id"] is not None:
            _check_str(leader["node_id"], "leader.node_id", 128, 1)
        token = leader["token"]
        if token is not None and type(token) is not int:
            _check_str(token, "leader.token", 64, 1)
        since = leader["since"]
        if since is not None and not isinstance(since, str):
            _check_number(since, "leader.since")
        elif since is not None:
            _check_timestamp(since, "leader.since")


def _check_envelope(type_: Any, node_id: Any, ts: Any, nonce: Any, body: Any,
                    version: int) -> None:
    if type_ not in TYPES:
        raise WireError("unknown_type", f"type {str(type_)[:32]!r}")
    _check_str(node_id, "node_id", 128, 1)
    _check_number(ts, "ts")
    nonce_str = _check_str(nonce, "nonce", 64, 16)
    if not set(nonce_str) <= _HEX:
        raise _bad("nonce must be lowercase hex")
    if not isinstance(body, dict):
        raise _bad("body must be an object")
    if type_ == ANNOUNCE:
        _check_announce(node_id, body, version)
    elif type_ == LEAVE:
        if body and body.keys() != {"reason"}:
            raise _bad("leave body may only carry 'reason'")
        if body:
            _check_str(body["reason"], "reason", 128)
    elif body:
        raise _bad("query body must be empty")


# -- replay protection ------------------------------------------------------------------


@attrs.define
class ReplayGuard:
    """Refuse datagrams whose ``ts`` is outside +-``window`` s or whose nonce was seen.

    A nonce is remembered only while its ``ts`` is still inside the window (later the
    datagram is refused as ``stale`` anyway), so memory is bounded by traffic; the
    ``max_nonces`` cap evicts the soonest-expiring nonce under a flood by key holders.
    """

    clock: SecondsClock
    window: float = 5.0
    max_nonces: int = 65536
    _seen: set[str] = attrs.field(factory=set, init=False)
    _expiry: list[tuple[float, str]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        if self.window <= 0 or self.max_nonces <= 0:
            raise ValueError("window and max_nonces must be positive")

    def check(self, ts: float, nonce: str) -> None:
        """Raise ``WireError`` unless (ts, nonce) is fresh; remember the nonce."""
        now = self.clock.seconds()
        if ts < now - self.window:
            raise WireError("stale", f"ts is {now - ts:.3f}s old")
        if ts > now + self.window:
            raise WireError("future", f"ts is {ts - now:.3f}s ahead")
        self._expire(now)
        if nonce in self._seen:
            raise WireError("replayed", f"nonce {nonce} already seen")
        while len(self._seen) >= self.max_nonces:
            _, old = heapq.heappop(self._expiry)
            self._seen.discard(old)
        self._seen.add(nonce)
        heapq.heappush(self._expiry, (ts + self.window, nonce))

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, old = heapq.heappop(self._expiry)
            self._seen.discard(old)

    def __len__(self) -> int:
        return len(self._seen)


# -- encode / decode --------------------------------------------------------------------


def encode(
    key: bytes,
    type_: str,
    node_id: str,
    body: dict[str, Any],
    *,
    ts: float,
    nonce: str | None = None,
) -> bytes:
    """Build a signed datagram; raise ``WireError`` if peers would refuse it.

    Version 3 only for an announce whose stats carry capacity, else 2 only when the body
    carries ``members`` (whose every entry must be valid), else 1.
    """
    nonce = secrets.token_hex(8) if nonce is None else nonce
    version = 1
    if type_ == ANNOUNCE:
        stats = body.get("stats")
        if isinstance(stats, dict) and CAPACITY_KEYS & stats.keys():
            version = 3
        elif "members" in body:
            version = 2
    _check_envelope(type_, node_id, ts, nonce, body, version)
    if "members" in body and type_ == ANNOUNCE:
        for entry in body["members"]:
            parse_member(entry)
    envelope: dict[str, Any] = {
        "v": version,
        "type": type_,
        "node_id": node_id,
        "ts": ts,
        "nonce": nonce,
        "body": body,
    }
    envelope["mac"] = _mac(key, envelope)
    data = canonical(envelope)
    if len(data) > MAX_DATAGRAM:
        raise WireError("oversized", f"{len(data)} bytes > {MAX_DATAGRAM}")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        # A duplicate key would make the MAC cover something other than what we act on.
        raise ValueError("duplicate key")
    return result


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("non-finite number")
    return value


def _reject_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def decode(key: bytes, data: bytes, guard: ReplayGuard | None = None) -> Message:
    """Parse and authenticate a datagram; raise ``WireError`` (and only that) if refused.

    Checks run cheapest first and the replay guard last, so unauthenticated traffic can
    never fill the nonce memory.
    """
    if len(data) > MAX_DATAGRAM:
        raise WireError("oversized", f"{len(data)} bytes > {MAX_DATAGRAM}")
    try:
        obj = json.loads(
            data,
            object_pairs_hook=_no_duplicates,
            parse_float=_finite_float,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise WireError("not_json", str(e)[:80]) from None
    if not isinstance(obj, dict):
        raise WireError("not_json", "datagram is not a JSON object")
    version = obj.get("v")
    if type(version) is not int or version not in VERSIONS:
        raise WireError("bad_version", f"v={str(version)[:16]!r}")
    if obj.keys() != _ENVELOPE_KEYS:
        raise _bad(f"envelope keys {sorted(obj.keys())[:10]}")
    mac = obj["mac"]
    if not isinstance(mac, str) or len(mac) != 64 or not set(mac) <= _HEX:
        raise _bad("mac must be 64 lowercase hex characters")
    if not hmac.compare_digest(_mac(key, obj), mac):
        raise WireError("bad_mac", "MAC does not match")
    _check_envelope(obj["type"], obj["node_id"], obj["ts"], obj["nonce"], obj["body"],
                    version)
    ts = float(obj["ts"])
    if guard is not None:
        guard.check(ts, obj["nonce"])
    body = obj["body"]
    members: list[Member] = []
    dropped = 0
    if "members" in body and obj["type"] == ANNOUNCE:
        body = {k: v for k, v in body.items() if k != "members"}
        for entry in obj["body"]["members"]:
            try:
                members.append(parse_member(entry))
            except WireError:
                dropped += 1
    return Message(
        type=obj["type"], node_id=obj["node_id"], ts=ts, nonce=obj["nonce"], body=body,
        version=version, members=tuple(members), dropped_members=dropped,
    )


@attrs.define
class Codec:
    """Encoder and decoder bound to one key, one replay guard and one wall clock."""

    key: bytes
    guard: ReplayGuard
    wall: Callable[[], float]

    @classmethod
    def from_secret(
        cls,
        secret: str | bytes,
        clock: SecondsClock,
        *,
        window: float = 5.0,
        wall: Callable[[], float] | None = None,
    ) -> Codec:
        """Build a codec; ``wall`` defaults to ``clock.seconds`` (wall time on a reactor)."""
        return cls(
            key=derive_key(secret),
            guard=ReplayGuard(clock, window),
            wall=clock.seconds if wall is None else wall,
        )

    def encode(self, type_: str, node_id: str, body: dict[str, Any]) -> bytes:
        """Sign a fresh datagram stamped with the wall clock and a random nonce."""
        return encode(self.key, type_, node_id, body, ts=self.wall())

    def decode(self, data: bytes) -> Message:
        """Authenticate ``data`` and check it against the replay guard."""
        return decode(self.key, data, self.guard)

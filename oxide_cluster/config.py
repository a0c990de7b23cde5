"""Node configuration: one typed model, four sources, later wins.

Sources in order: built-in defaults < YAML file (``--config``) < ``OXIDE_*``
environment < command line. Every key is declared once in :data:`SETTINGS`, so the
YAML loader, the environment reader, the command-line options and the README table
cannot drift apart. Unknown keys and bad values raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from oxide_cluster.cgroups import MODES, ResourceError, Resources, parse_resources, parse_size


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key."""


def _positive_int(value: Any) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be a whole number >= 1")
    return number


def _port(value: Any) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be a port number 0-65535")
    return number


def _positive_float(value: Any) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be a number > 0")
    return number


def _non_negative_float(value: Any) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError("must be a number >= 0")
    return number


def _percent(value: Any) -> float:
    number = float(value)
    if not 0 < number <= 100:
        raise ValueError("must be a percentage in (0, 100]")
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError("must be a string")
    return str(value)


def _optional_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return _text(value)


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _on_off(value: Any) -> bool:
    """A boolean that defaults to off, so it is an option taking a value, not a --no- flag."""
    return _flag(value)


def _word_list(value: Any) -> tuple[str, ...]:
    """A comma separated string (environment, command line) or a YAML list."""
    if isinstance(value, list | tuple):
        items = [_text(item).strip() for item in value]
    else:
        items = [part.strip() for part in _text(value).split(",")]
    return tuple(item for item in items if item)


def _labels(value: Any) -> dict[str, str]:
    """``k=v,k2=v2`` (environment, command line) or a YAML mapping."""
    if isinstance(value, Mapping):
        return {_text(k): _text(v) for k, v in value.items()}
    labels: dict[str, str] = {}
    for item in _word_list(value):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label {item!r} is not key=value")
        labels[key.strip()] = val.strip()
    return labels


def _log_format(value: Any) -> str:
    text = _text(value)
    if text not in ("text", "json"):
        raise ValueError("must be 'text' or 'json'")
    return text


def _cgroup_mode(value: Any) -> str:
    text = _text(value).strip().lower()
    if text not in MODES:
        raise ValueError(f"must be one of {', '.join(MODES)}")
    return text


def _resources(value: Any) -> Resources:
    """``cpus=1,memory=2G,pids=512`` (environment, command line) or a YAML mapping."""
    raw = dict(value) if isinstance(value, Mapping) else dict(_labels(value))
    if isinstance(raw.get("cpus"), str):  # text from the environment or command line
        try:
            raw["cpus"] = float(raw["cpus"])
        except ValueError:
            raise ValueError("default_resources.cpus: must be a number of CPUs") from None
    try:
        return parse_resources(raw, "default_resources")
    except ResourceError as error:
        raise ValueError(str(error)) from None


def _reserve(value: Any) -> Resources:
    """``cpus=0.5,memory=512M`` kept from the tasks for the agent and the OS."""
    raw = dict(value) if isinstance(value, Mapping) else dict(_labels(value))
    if "pids" in raw:
        raise ValueError("reserve.pids: only cpus and memory are reserved")
    if isinstance(raw.get("cpus"), str):
        try:
            raw["cpus"] = float(raw["cpus"])
        except ValueError:
            raise ValueError("reserve.cpus: must be a number of CPUs") from None
    try:
        return parse_resources(raw, "reserve")
    except ResourceError as error:
        raise ValueError(str(error)) from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(value: Any) -> float:
    """Seconds from a number or ``"90m"``/``"12h"``/``"14d"``/``"2w"``."""
    if isinstance(value, bool):
        raise ValueError("must be seconds or a duration like '14d'")
    if isinstance(value, int | float):
        number = float(value)
    else:
        match = _DURATION.match(_text(value))
        if match is None:
            raise ValueError("must be seconds or a duration like '14d'")
        number = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if not number > 0:
        raise ValueError("must be a duration > 0")
    return number


def _optional_size(value: Any) -> int | None:
    """Bytes from a number or ``"10G"``; none (empty) for the default."""
    if value is None or value == "":
        return None
    try:
        return parse_size("store_limit", value)
    except ResourceError as error:
        raise ValueError(error.message) from None


def _size(value: Any) -> int:
    """Bytes from a number or ``"2G"``."""
    if (isinstance(value, int) and not isinstance(value, bool)) or \
            (isinstance(value, str) and value.strip().isdigit()):
        return _positive_int(value)
    try:
        size = parse_size("size", value)
    except ResourceError as error:
        raise ValueError(error.message) from None
    if size <= 0:
        raise ValueError("must be a size > 0")
    return size


def _name(value: Any) -> str:
    """A provider name; whether it is installed is checked at start-up (providers.py)."""
    text = _text(value).strip().lower()
    if not text:
        raise ValueError("must name a provider")
    return text


def _optional_name(value: Any) -> str | None:
    return None if value is None or value == "" else _name(value)


def _multicast_group(value: Any) -> str:
    # Imported here: discovery imports much more than the config needs.
    from oxide_cluster.discovery import parse_multicast_group

    group, port = parse_multicast_group(_text(value))
    return f"{group}:{port}"


def _ttl(value: Any) -> int:
    number = int(value)
    if not 0 <= number <= 255:
        raise ValueError("must be a TTL 0-255")
    return number


@attrs.frozen
class Setting:
    """One configuration key: its parser, default and the help shown everywhere."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    env: str = ""

    @property
    def env_name(self) -> str:
        return self.env or "OXIDE_" + self.name.upper()

    @property
    def option(self) -> str:
        return self.name.replace("_", "-")


def _cpu_count() -> int:
    return os.cpu_count() or 1


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", _text, "tcp:4000",
            "HTTP/WebSocket listener as a Twisted endpoint string (ssl: for TLS)"),
    Setting("state_dir", _text, "~/.oxide",
            "directory for the SQLite store, node id and generated secret"),
    Setting("secret", _optional_text, None,
            "cluster secret (prefer the environment or --secret-file)",
            env="OXIDE_CLUSTER_SECRET"),
    Setting("secret_file", _optional_text, None,
            "file holding the cluster secret (e.g. a Docker secret)",
            env="OXIDE_CLUSTER_SECRET_FILE"),
    Setting("cluster_name", _text, "oxide", "cluster name (Redis key prefix)"),
    Setting("max_tasks", _positive_int, None,
            "concurrent task slots (default: number of CPUs)"),
    Setting("max_cpu_percent", _percent, 100.0,
            "refuse new tasks while the host CPU is above this (100 = never)"),
    Setting("max_memory_percent", _percent, 95.0,
            "refuse new tasks while host memory use is above this"),
    Setting("output_limit", _positive_int, 64 * 1024 * 1024,
            "bytes of output kept per task; the rest is discarded and counted"),
    Setting("default_timeout", _positive_float, 3600.0,
            "task wall-clock timeout in seconds when a request gives none"),
    Setting("max_timeout", _positive_float, 86400.0,
            "largest task timeout a request may ask for, in seconds"),
    Setting("queue_timeout", _positive_float, 3600.0,
            "seconds a task may wait in the queue when a request gives none; then rejected"),
    Setting("kill_grace", _positive_float, 5.0,
            "seconds between SIGTERM and SIGKILL when a task is stopped"),
    Setting("max_body", _positive_int, 1024 * 1024,
            "largest accepted HTTP request body in bytes"),
    Setting("sample_interval", _positive_float, 1.0,
            "seconds between CPU/memory/load samples"),
    Setting("labels", _labels, {}, "node labels for placement, k=v,k2=v2"),
    Setting("discovery", _flag, True,
            "UDP discovery (this node announces itself and learns its peers)"),
    Setting("discovery_port", _port, 4001, "UDP port of the discovery protocol"),
    Setting("discovery_transport", _name, "broadcast",
            "discovery transport provider: broadcast (plus peers), peers (unicast only), "
            "multicast, or an installed plugin's"),
    Setting("discovery_interface", _word_list, (),
            "interfaces to broadcast on (default: every non-loopback IPv4 one)"),
    Setting("peers", _word_list, (),
            "static host:port peers for networks without broadcast"),
    Setting("multicast_group", _multicast_group, "239.255.77.1:4002",
            "IPv4 group[:port] of discovery_transport multicast"),
    Setting("multicast_ttl", _ttl, 1,
            "multicast TTL: 1 stays on the segment, more crosses multicast routers"),
    Setting("multicast_interface", _optional_text, None,
            "IPv4 address of the interface to join and send multicast on (default: route)"),
    Setting("announce_interval", _positive_float, 0.25,
            "seconds between discovery announcements"),
    Setting("dead_after", _positive_float, 2.5,
            "seconds of silence before a peer is declared dead"),
    Setting("redis", _optional_text, None,
            "Redis URL for leader election (none: standalone leader)",
            env="OXIDE_REDIS_URL"),
    Setting("election", _optional_name, None,
            "election provider: standalone or redis (default: redis when 'redis' is set)"),
    Setting("leader_ttl", _positive_float, 2.0,
            "seconds a Redis leader lease lasts (failover after a crash takes about this)"),
    Setting("peer_timeout", _positive_float, 30.0,
            "seconds a node waits for a peer's answer (a forward to the leader, a "
            "placement, a queued task's dispatch) beyond the request's own wait; then the "
            "peer counts as unreachable"),
    Setting("workspace_cache", _positive_int, 4 * 1024 ** 3,
            "bytes of workspace and artifact blobs kept in the state dir (LRU beyond)"),
    Setting("artifact_limit", _positive_int, 256 * 1024 * 1024,
            "bytes of artifacts kept per task; the rest is not kept and the cut recorded"),
    Setting("keep_failed_workspaces", _non_negative_float, 0.0,
            "seconds to keep the directory of a task that did not succeed (0: remove); "
            "counted in workspace_cache, removed early when a blob needs the room"),
    Setting("git_cache", _size, 2 * 1024 ** 3,
            "bytes of git mirrors kept in the state dir, e.g. 2G (least recently used "
            "pruned beyond)"),
    Setting("git_cache_age", _duration, 30 * 86400.0,
            "a git mirror unused this long is pruned: seconds or 12h, 30d, 2w"),
    Setting("runner", _name, "process",
            "task runner provider: process (own process group, isolated per 'cgroups')"),
    Setting("provider_options", _labels, {},
            "options of plugin providers, k=v,k2=v2 (each provider lists its own)"),
    Setting("cgroups", _cgroup_mode, "auto",
            "a cgroup per task: auto (v2, else v1, else off), or force v2, v1 or off"),
    Setting("cgroup_root", _optional_text, None,
            "delegated cgroup v2 directory for tasks (default: the agent's own cgroup)"),
    Setting("default_resources", _resources, Resources(),
            "limits of a task that declares none, cpus=1.5,memory=2G,pids=512"),
    Setting("run_as", _optional_text, None,
            "user the tasks run as when the agent runs as root (default: the agent's user)"),
    Setting("task_dir", _optional_text, None,
            "directory task workspaces are made in (default: <state_dir>/workspaces; with "
            "run_as, <state_dir>-tasks, as the 0700 state dir is closed to that user)"),
    Setting("reserve", _reserve, Resources(),
            "CPUs and memory kept from the tasks' declared resources for the agent and "
            "the OS, cpus=0.5,memory=512M"),
    Setting("keep_tasks", _duration, 14 * 86400.0,
            "how long finished tasks and their output are kept: seconds or 12h, 14d, 2w"),
    Setting("store_limit", _optional_size, None,
            "bytes the task store may hold, e.g. 10G; oldest finished tasks go first "
            "(default: a tenth of the state dir's filesystem)"),
    Setting("stop_grace", _duration, 0.0,
            "seconds running tasks may take to finish at stop (SIGTERM): the node drains "
            "first, then cancels what is left (0: cancel at once)"),
    Setting("drain", _on_off, False,
            "start draining (true/false): take no new tasks until POST /node/resume"),
    Setting("log_format", _log_format, "text", "log lines as 'text' or 'json'"),
    Setting("access_log", _on_off, False,
            "one log line per HTTP request (true/false); /metrics counts requests either way"),
)

SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


@attrs.frozen
class Config:
    """The resolved configuration of one node."""

    listen: str
    state_dir: Path
    secret: str | None
    secret_file: str | None
    cluster_name: str
    max_tasks: int
    max_cpu_percent: float
    max_memory_percent: float
    output_limit: int
    default_timeout: float
    max_timeout: float
    queue_timeout: float
    kill_grace: float
    max_body: int
    sample_interval: float
    labels: dict[str, str]
    discovery: bool
    discovery_port: int
    discovery_interface: tuple[str, ...]
    peers: tuple[str, ...]
    announce_interval: float
    dead_after: float
    redis: str | None
    leader_ttl: float
    log_format: str
    access_log: bool = False
    workspace_cache: int = 4 * 1024 ** 3
    artifact_limit: int = 256 * 1024 * 1024
    keep_failed_workspaces: float = 0.0
    git_cache: int = 2 * 1024 ** 3
    git_cache_age: float = 30 * 86400.0
    cgroups: str = "auto"
    cgroup_root: str | None = None
    default_resources: Resources = attrs.field(factory=Resources)
    reserve: Resources = attrs.field(factory=Resources)
    run_as: str | None = None
    task_dir: str | None = None
    keep_tasks: float = 14 * 86400.0
    store_limit: int | None = None
    drain: bool = False
    stop_grace: float = 0.0
    discovery_transport: str = "broadcast"
    multicast_group: str = "239.255.77.1:4002"
    multicast_ttl: int = 1
    multicast_interface: str | None = None
    election: str | None = None
    runner: str = "process"
    provider_options: dict[str, str] = attrs.field(factory=dict)
    peer_timeout: float = 30.0

    @property
    def clustered(self) -> bool:
        """True when this node is configured to work with others beyond broadcast."""
        return bool(self.redis or self.peers)


def _parse(name: str, raw: Any, source: str) -> Any:
    setting = SETTINGS_BY_NAME.get(name)
    if setting is None:
        raise ConfigError(f"unknown configuration key {name!r} in {source}")
    try:
        return setting.parse(raw)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad value for {name!r} in {source}: {error}") from None


def read_yaml(path: str) -> dict[str, Any]:
    """Parse a YAML config file into raw values keyed by setting name."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    values = {}
    for key, raw in data.items():
        name = str(key).replace("-", "_")
        values[name] = _parse(name, raw, f"config file {path}")
    return values


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Values from ``OXIDE_*`` variables; unknown ``OXIDE_`` names are errors."""
    by_env = {setting.env_name: setting for setting in SETTINGS}
    # OXIDE_NODE is the CLI's node URL: set beside the agent on CI hosts, not a key.
    allowed_extra = {"OXIDE_CONFIG", "OXIDE_NODE"}
    values = {}
    for env_name, raw in environ.items():
        if not env_name.startswith("OXIDE_"):
            continue
        setting = by_env.get(env_name)
        if setting is None:
            if env_name in allowed_extra:
                continue
            raise ConfigError(f"unknown configuration variable {env_name}")
        values[setting.name] = _parse(setting.name, raw, f"environment {env_name}")
    return values


def load(
    command_line: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: str | None = None,
) -> Config:
    """Resolve defaults < YAML < environment < command line into a Config."""
    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    config_file = config_file or environ.get("OXIDE_CONFIG")
    if config_file:
        values.update(read_yaml(config_file))
    values.update(read_environment(environ))
    for name, raw in command_line.items():
        if raw is not None:
            values[name] = _parse(name, raw, f"option --{name.replace('_', '-')}")
    if values["max_tasks"] is None:
        values["max_tasks"] = _cpu_count()
    if values["default_timeout"] > values["max_timeout"]:
        raise ConfigError("'default_timeout' must not exceed 'max_timeout'")
    values["state_dir"] = Path(os.path.expanduser(values["state_dir"]))
    return Config(**values)

"""The deploy files say what we mean: parsed, cross-checked, and validated by real tools.

No Docker engine runs here, so what a container would run is run directly elsewhere
(tests/integration/test_container_commands.py); this module checks the files themselves.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oxide_cluster import config, fanout, queue_split
from tests import dockerfile
from tests.support import REPO_ROOT

COMPOSE = REPO_ROOT / "compose" / "docker-compose.yml"
STACK = REPO_ROOT / "deploy" / "stack.yml"
UNIT = REPO_ROOT / "deploy" / "oxide-cluster.service"
ENV_EXAMPLE = REPO_ROOT / "deploy" / "oxide-cluster.env.example"
STATE_DIR = "/var/lib/oxide-cluster"
NODES = ("node1", "node2", "node3")

# Config names, the CLI's node URL and config file, the names every task receives, and
# those of a fan-out's shards and work-queue batches.
KNOWN_ENV = ({setting.env_name for setting in config.SETTINGS} | {"OXIDE_NODE", "OXIDE_CONFIG"}
             | {"OXIDE_TASK_ID", "OXIDE_NODE_ID"}
             | {name for name in fanout.shard_env(0, 2) if name.startswith("OXIDE_")}
             | set(queue_split.queue_env(0, 2, 1)))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def deploy_files() -> list[Path]:
    files = [*sorted((REPO_ROOT / "compose").glob("*.yml")), dockerfile.DOCKERFILE,
             STACK, UNIT, ENV_EXAMPLE]
    docs = REPO_ROOT / "README.rst"
    return files + ([docs] if docs.exists() else [])


# -- every OXIDE_* name is a real setting, and every value parses -----------------------

@pytest.mark.parametrize("path", deploy_files(), ids=lambda p: p.name)
def test_every_oxide_variable_named_in_deploy_files_is_a_setting(path):
    names = set(re.findall(r"\bOXIDE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert names, f"{path.name} names no OXIDE_* variable"
    assert names <= KNOWN_ENV, f"unknown in {path.name}: {sorted(names - KNOWN_ENV)}"


def env_example_values() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, line
            values[key] = value
    return values


def environments() -> dict[str, dict[str, str]]:
    compose, stack = load(COMPOSE), load(STACK)
    found = {"Dockerfile": dockerfile.runtime().env(), "env.example": env_example_values()}
    for name in NODES:
        found[f"compose {name}"] = compose["services"][name]["environment"]
    found["stack oxide"] = stack["services"]["oxide"]["environment"]
    return found


@pytest.mark.parametrize("where", sorted(environments()))
def test_deploy_environments_are_valid_configuration(where):
    environ = {k: str(v) for k, v in environments()[where].items() if k.startswith("OXIDE_")}
    image = {k: v for k, v in dockerfile.runtime().env().items() if k.startswith("OXIDE_")}
    if where.startswith(("compose", "stack")):
        environ = {**image, **environ}  # the containers start from the image's ENV
    resolved = config.load({}, environ)
    if "OXIDE_REDIS_URL" in environ:
        assert resolved.redis and resolved.redis.startswith("redis://")


# -- compose: local cluster -------------------------------------------------------------

def test_compose_runs_redis_and_three_nodes_on_one_bridge():
    compose = load(COMPOSE)
    services = compose["services"]
    assert set(services) == {"redis", *NODES}
    assert compose["networks"]["oxide"]["driver"] == "bridge"
    for name in services:
        assert services[name]["networks"] == ["oxide"], name


def test_compose_has_no_restart_policy_that_would_hide_a_killed_node():
    for name, service in load(COMPOSE)["services"].items():
        assert "restart" not in service, name
        assert "restart_policy" not in service.get("deploy", {}), name


def test_compose_redis_healthcheck_really_pings_and_nodes_wait_for_it():
    services = load(COMPOSE)["services"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in NODES:
        node = services[name]
        assert node["depends_on"] == {"redis": {"condition": "service_healthy"}}
        assert node["environment"]["OXIDE_REDIS_URL"] == "redis://redis:6379/0"


def test_compose_nodes_publish_distinct_host_ports_to_the_api_port():
    services = load(COMPOSE)["services"]
    published = []
    for name in NODES:
        [mapping] = services[name]["ports"]
        host, container = mapping.split(":")
        assert container == "4000", name
        published.append(int(host))
    assert sorted(published) == [4100, 4101, 4102]
    image_listen = dockerfile.runtime().env()["OXIDE_LISTEN"]
    assert image_listen == "tcp:4000"


def test_compose_nodes_have_their_own_state_volume_and_the_file_secret():
    compose = load(COMPOSE)
    secret_file = compose["secrets"]["oxide_cluster_secret"]["file"]
    assert secret_file == "./cluster_secret.txt"
    volumes = []
    for name in NODES:
        node = compose["services"][name]
        assert node["secrets"] == ["oxide_cluster_secret"]
        secret_path = node["environment"]["OXIDE_CLUSTER_SECRET_FILE"]
        assert secret_path == "/run/secrets/oxide_cluster_secret"
        [volume] = node["volumes"]
        source, target = volume.split(":")
        assert target == STATE_DIR
        volumes.append(source)
        assert node["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert len(set(volumes)) == 3
    assert (COMPOSE.parent / compose["services"]["node1"]["build"]["context"]
            / "deploy" / "Dockerfile").resolve() == dockerfile.DOCKERFILE


def test_the_compose_secret_file_is_ignored_by_git_and_docker():
    ignored = subprocess.run(["git", "check-ignore", "-q", "compose/cluster_secret.txt"],
                             cwd=REPO_ROOT)
    assert ignored.returncode == 0, "compose/cluster_secret.txt must be gitignored"
    assert "compose/cluster_secret.txt" in (REPO_ROOT / ".dockerignore").read_text()


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose (v1, Debian package) not installed")
def test_docker_compose_accepts_the_compose_file(tmp_path):
    copy = tmp_path / "compose"
    copy.mkdir()
    (copy / "docker-compose.yml").write_text(COMPOSE.read_text())
    (copy / "cluster_secret.txt").write_text("test\n")
    result = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "config", "-q"],
                            cwd=copy, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- Swarm stack ------------------------------------------------------------------------

def test_stack_spreads_replicas_over_nodes_with_resources_and_safe_updates():
    oxide = load(STACK)["services"]["oxide"]
    deploy = oxide["deploy"]
    assert deploy["mode"] == "replicated"
    assert deploy["placement"]["max_replicas_per_node"] == 1
    assert any("spread" in pref for pref in deploy["placement"]["preferences"])
    for kind in ("limits", "reservations"):
        assert {"cpus", "memory"} <= set(deploy["resources"][kind]), kind
    assert deploy["update_config"]["failure_action"] == "rollback"
    assert deploy["update_config"]["parallelism"] == 1
    assert deploy["rollback_config"]["parallelism"] == 1
    assert [v for v in oxide["volumes"] if v.endswith(":" + STATE_DIR)]


def test_stack_discovers_peers_by_swarm_dns_on_an_overlay_network():
    stack = load(STACK)
    assert stack["networks"]["oxide"]["driver"] == "overlay"
    env = stack["services"]["oxide"]["environment"]
    peers = config.load({}, {"OXIDE_PEERS": env["OXIDE_PEERS"]}).peers
    assert peers == ("tasks.oxide:4001",)
    assert env["OXIDE_REDIS_URL"] == "redis://redis:6379/0"
    assert stack["services"]["redis"]["networks"] == ["oxide"]


def test_stack_secret_is_external_and_mounted_where_the_agent_reads_it():
    stack = load(STACK)
    assert stack["secrets"]["oxide_cluster_secret"] == {"external": True}
    [secret] = stack["services"]["oxide"]["secrets"]
    path = "/run/secrets/" + secret["target"]
    assert stack["services"]["oxide"]["environment"]["OXIDE_CLUSTER_SECRET_FILE"] == path
    assert dockerfile.runtime().env()["OXIDE_CLUSTER_SECRET_FILE"] == path
    assert secret["uid"] == "10001" and secret["mode"] == 0o400


def test_stack_redis_keeps_its_data_and_is_health_checked():
    redis = load(STACK)["services"]["redis"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "--appendonly" in redis["command"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI not installed")
def test_docker_stack_config_accepts_the_stack_file():
    result = subprocess.run(["docker", "stack", "config", "-c", str(STACK)],
                            capture_output=True, text=True)
    if result.returncode != 0 and "unknown command" in result.stderr:
        pytest.skip("this docker CLI has no 'stack config'")
    assert result.returncode == 0, result.stderr


# -- Dockerfile -------------------------------------------------------------------------

def test_dockerfile_builds_a_wheel_then_installs_it_in_a_slim_image():
    builder, runtime = dockerfile.parse()
    assert builder.name == "builder"
    assert any("pip wheel" in run and "-c requirements.txt" in run
               for run in builder.all("RUN"))
    assert runtime.base == "python:3.11-slim"
    assert any(copy.startswith("--from=builder ") for copy in runtime.all("COPY"))
    assert any("--no-index" in run for run in runtime.all("RUN"))


def test_dockerfile_runs_as_a_user_owning_the_state_volume():
    runtime = dockerfile.runtime()
    user = runtime.last("USER")
    assert user not in (None, "root", "0")
    assert runtime.env()["OXIDE_STATE_DIR"] == STATE_DIR
    assert STATE_DIR in runtime.last("VOLUME")
    assert any(f"-o {user} -g {user}" in run and STATE_DIR in run
               for run in runtime.all("RUN"))


def test_dockerfile_runs_twistd_and_checks_ready_with_its_own_checker():
    options, command = dockerfile.runtime().healthcheck()
    assert command == ["python", "-m", "oxide_cluster.healthcheck"]
    assert {"interval", "timeout", "retries"} <= set(options)
    assert dockerfile.container_command() == ["twistd", "-n", "--pidfile=", "oxide-cluster"]
    assert "4000/tcp" in dockerfile.runtime().last("EXPOSE")


# -- systemd ----------------------------------------------------------------------------

def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_runs_as_a_dedicated_user_with_hardening_and_a_clean_stop():
    unit = unit_settings()
    assert unit["User"] == ["oxide"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillMode"] == ["mixed"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ProtectHome"] == ["yes"]
    assert unit["PrivateTmp"] == ["yes"]
    assert unit["ReadWritePaths"] == [STATE_DIR]
    assert unit["StateDirectory"] == ["oxide-cluster"]
    assert unit["EnvironmentFile"] == ["/etc/oxide-cluster/env"]
    default_grace = config.SETTINGS_BY_NAME["kill_grace"].default
    assert float(unit["TimeoutStopSec"][0]) > default_grace + 5  # + the executor's give-up
    stop_grace = next(float(value.split("=", 1)[1]) for value in unit["Environment"]
                      if value.startswith("OXIDE_STOP_GRACE="))
    assert stop_grace >= 60  # a stop drains: running jobs get time to finish
    assert float(unit["TimeoutStopSec"][0]) > stop_grace + default_grace + 5
    assert unit["ExecStart"][0].split()[1:] == ["-n", "--pidfile=", "oxide-cluster"]
    assert f"OXIDE_STATE_DIR={STATE_DIR}" in unit["Environment"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    # verify checks that ExecStart exists: point it at this machine's Python.
    text = UNIT.read_text().replace(
        "/opt/oxide-cluster/bin/twistd", f"{sys.executable} -m twisted.scripts.twistd")
    unit = tmp_path / "oxide-cluster.service"
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "oxide-cluster.service" not in result.stderr, result.stderr


# -- install commands: README, CI and the systemd recipe use the pinned files ------------

def _readme_command(after: str) -> str:
    text = (REPO_ROOT / "README.rst").read_text()
    block = text[text.index(after):].split("::\n\n", 1)[1]
    return block.splitlines()[0].strip()


def _normalised(step: str) -> str:
    """A shell step without the flags and redirections that only make CI quieter."""
    words = [word for word in step.split() if word not in ("-q", "-qq", ">/dev/null")]
    return " ".join(words)


def test_ci_runs_the_readme_test_command_step_by_step():
    readme_steps = [_normalised(step) for step in
                    _readme_command("sets up and runs the whole test suite").split(" && ")]
    ci_lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    ci_steps = [_normalised(line) for line in ci_lines
                if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert ci_steps == readme_steps
    assert "python3 -m venv --clear .venv" in ci_steps
    assert "pip install -c constraints.txt '.[test]'" in ci_steps


def test_node_command_installs_the_runtime_pins_into_a_virtualenv():
    command = _readme_command("sets up and starts a node")
    assert "python3 -m venv .venv" in command
    assert ".venv/bin/pip install -c requirements.txt ." in command
    assert command.endswith(".venv/bin/twistd -n --pidfile= oxide-cluster")
    assert "-c requirements.txt" in UNIT.read_text()

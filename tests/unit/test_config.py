from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oxide_cluster import config
from oxide_cluster.config import ConfigError


def test_defaults_when_nothing_is_given():
    loaded = config.load({}, {})
    assert loaded.listen == "tcp:4000"
    assert loaded.max_tasks >= 1
    assert loaded.discovery is True
    assert loaded.redis is None
    assert str(loaded.state_dir).endswith(".oxide")


def test_later_sources_win(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("max_tasks: 3\nkill_grace: 7\nlisten: tcp:5000\nlabels: {gpu: 'no'}\n")
    environ = {"OXIDE_MAX_TASKS": "5", "OXIDE_KILL_GRACE": "8"}
    loaded = config.load({"max_tasks": "9"}, environ, str(path))
    assert loaded.max_tasks == 9  # command line over environment
    assert loaded.kill_grace == 8.0  # environment over file
    assert loaded.listen == "tcp:5000"  # file over default
    assert loaded.labels == {"gpu": "no"}


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("max_taskz: 3\n")
    with pytest.raises(ConfigError, match="max_taskz"):
        config.load({}, {}, str(path))


def test_bad_value_names_key_and_source():
    with pytest.raises(ConfigError, match=r"'max_tasks' in environment OXIDE_MAX_TASKS"):
        config.load({}, {"OXIDE_MAX_TASKS": "many"})


def test_unknown_environment_name_is_an_error():
    with pytest.raises(ConfigError, match="OXIDE_MAX_TASK"):
        config.load({}, {"OXIDE_MAX_TASK": "2"})


def test_cli_node_url_in_environment_is_allowed():
    assert config.load({}, {"OXIDE_NODE": "http://x:4000"}).listen == "tcp:4000"


def test_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load({}, {}, str(path))


def test_invalid_yaml_is_reported(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("max_tasks: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load({}, {}, str(path))


def test_default_timeout_cannot_exceed_maximum():
    with pytest.raises(ConfigError, match="default_timeout"):
        config.load({"default_timeout": "100", "max_timeout": "10"}, {})


def test_labels_and_lists_from_strings():
    loaded = config.load({"labels": "os=linux, arch=amd64", "peers": "a:4001,b:4001"}, {})
    assert loaded.labels == {"os": "linux", "arch": "amd64"}
    assert loaded.peers == ("a:4001", "b:4001")


def test_every_setting_has_a_distinct_environment_name():
    names = [setting.env_name for setting in config.SETTINGS]
    assert len(names) == len(set(names))
    assert "OXIDE_CLUSTER_SECRET" in names and "OXIDE_REDIS_URL" in names


@given(st.dictionaries(st.text(max_size=12), st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
    st.lists(st.text(max_size=5), max_size=3)), max_size=5))
def test_any_yaml_mapping_loads_or_fails_with_config_error(tmp_path_factory, mapping):
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "node.yaml"
    path.write_text(yaml.safe_dump(mapping))
    try:
        config.load({}, {}, str(path))
    except ConfigError:
        pass


def test_queue_timeout_has_a_default_and_comes_from_every_source(tmp_path):
    assert config.load({}, {}).queue_timeout == 3600.0
    path = tmp_path / "node.yaml"
    path.write_text("queue_timeout: 120\n")
    assert config.load({}, {}, str(path)).queue_timeout == 120.0
    assert config.load({}, {"OXIDE_QUEUE_TIMEOUT": "60"}, str(path)).queue_timeout == 60.0
    assert config.load({"queue_timeout": "5"}, {"OXIDE_QUEUE_TIMEOUT": "60"}).queue_timeout == 5
    with pytest.raises(ConfigError, match="queue_timeout"):
        config.load({"queue_timeout": "0"}, {})


def test_peer_timeout_defaults_to_30_s_and_comes_from_every_source(tmp_path):
    assert config.load({}, {}).peer_timeout == 30.0
    path = tmp_path / "node.yaml"
    path.write_text("peer_timeout: 10\n")
    assert config.load({}, {}, str(path)).peer_timeout == 10.0
    assert config.load({}, {"OXIDE_PEER_TIMEOUT": "4"}, str(path)).peer_timeout == 4.0
    assert config.load({"peer_timeout": "2.5"}, {"OXIDE_PEER_TIMEOUT": "4"}).peer_timeout == 2.5
    with pytest.raises(ConfigError, match="peer_timeout"):
        config.load({"peer_timeout": "0"}, {})


def test_cgroup_settings_from_environment_and_yaml(tmp_path):
    from oxide_cluster.cgroups import Resources
    path = tmp_path / "c.yaml"
    path.write_text("default_resources:\n  memory: 2G\n  pids: 512\ncgroups: v1\n")
    loaded = config.load({}, {"OXIDE_DEFAULT_RESOURCES": "cpus=1.5"}, str(path))
    assert loaded.default_resources == Resources(cpus=1.5)  # the environment wins whole
    assert loaded.cgroups == "v1"
    loaded = config.load({}, {}, str(path))
    assert loaded.default_resources == Resources(memory=2 * 1024 ** 3, pids=512)
    assert config.load({}, {}).cgroups == "auto"
    with pytest.raises(config.ConfigError, match=r"'cgroups'.*auto, v2, v1, off"):
        config.load({"cgroups": "v3"}, {})
    with pytest.raises(config.ConfigError, match=r"default_resources\.memory"):
        config.load({"default_resources": "memory=lots"}, {})

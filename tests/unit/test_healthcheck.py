"""The container healthcheck finds the node from the agent's own environment."""

from __future__ import annotations

import pytest

from oxide_cluster.healthcheck import check, read_secret, ready_url


@pytest.mark.parametrize(("listen", "url"), [
    ("tcp:4000", "http://127.0.0.1:4000/ready"),
    ("tcp:port=4100:interface=0.0.0.0", "http://127.0.0.1:4100/ready"),
    ("tcp:4200:interface=10.0.0.5", "http://10.0.0.5:4200/ready"),
    ("ssl:4443:privateKey=key.pem", "https://127.0.0.1:4443/ready"),
])
def test_ready_url_follows_the_listen_endpoint(listen, url):
    assert ready_url(listen) == url


def test_ready_url_without_a_port_is_an_error():
    with pytest.raises(ValueError, match="port"):
        ready_url("unix:/run/oxide.sock")


def test_secret_comes_from_the_variable_before_the_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text("from-file\n")
    assert read_secret({"OXIDE_CLUSTER_SECRET_FILE": str(path)}) == "from-file"
    assert read_secret({"OXIDE_CLUSTER_SECRET": "direct",
                        "OXIDE_CLUSTER_SECRET_FILE": str(path)}) == "direct"


def test_check_without_a_secret_is_unhealthy():
    healthy, why = check({"OXIDE_LISTEN": "tcp:4000"})
    assert not healthy
    assert "OXIDE_CLUSTER_SECRET" in why


def test_check_against_a_closed_port_is_unhealthy(tmp_path):
    from tests.support import free_port

    healthy, _ = check({"OXIDE_LISTEN": f"tcp:{free_port()}", "OXIDE_CLUSTER_SECRET": "x"},
                       timeout=2)
    assert not healthy

"""The image's ENTRYPOINT and HEALTHCHECK, taken from deploy/Dockerfile and run for real.

No Docker engine here: the commands run on this host with the repository on PYTHONPATH,
the image's ENV (paths moved into a temp dir) and the secret as a file, like a Docker secret.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests import dockerfile
from tests.support import SECRET, TWISTD, AgentProcess, free_port


class ContainerAgent(AgentProcess):
    """An agent started with the Dockerfile's command line and environment."""

    def __init__(self, home: Path) -> None:
        super().__init__(home, secret=None)
        self.secret = SECRET
        self.secret_path = home / "run" / "secrets" / "oxide_cluster_secret"

    def argv(self) -> list[str]:
        command = dockerfile.container_command()
        assert command[0] == "twistd"
        return [*TWISTD, *command[1:]]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.pop("OXIDE_CLUSTER_SECRET", None)  # only the Docker-secret file, as in the image
        image = dockerfile.runtime().env()
        env.update(image)
        # The image's paths and port, moved to this test's temp dir and a free port.
        env["OXIDE_STATE_DIR"] = str(self.state_dir)
        env["OXIDE_CLUSTER_SECRET_FILE"] = str(self.secret_path)
        assert image["OXIDE_LISTEN"] == "tcp:4000"
        env["OXIDE_LISTEN"] = f"tcp:{self.port}:interface=127.0.0.1"
        # Discovery would broadcast on this host's real networks; containers have their own.
        env["OXIDE_DISCOVERY"] = "false"
        env["OXIDE_DISCOVERY_PORT"] = str(free_port(socket.SOCK_DGRAM))
        return env

    def start(self, wait: bool = True) -> None:
        self.secret_path.parent.mkdir(parents=True, exist_ok=True)
        self.secret_path.write_text(SECRET + "\n")
        super().start(wait)

    def healthcheck(self, **overrides: str) -> subprocess.CompletedProcess[str]:
        """The HEALTHCHECK command, run with the container's environment."""
        options, command = dockerfile.runtime().healthcheck()
        assert command[0] == "python"
        env = {**self.environment(), **overrides}
        timeout = float(options["timeout"].rstrip("s"))
        return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True,
                              text=True, timeout=timeout + 5)


def test_entrypoint_serves_tasks_and_healthcheck_tracks_the_node(tmp_path):
    agent = ContainerAgent(tmp_path / "container")
    try:
        agent.start()
        check = agent.healthcheck()
        assert check.returncode == 0, check.stdout + check.stderr
        assert agent.run_task("sh", "-c", "id -un")["state"] == "succeeded"
        # The node read the secret file: the secret works, and the state dir is the image's.
        assert agent.get("/ready").status == 200
        assert (agent.state_dir / "node_id").exists()
        wrong = agent.healthcheck(OXIDE_CLUSTER_SECRET="not-the-secret")
        assert wrong.returncode != 0, "the check must use the secret: /ready needs it"
        agent.stop()
        stopped = agent.healthcheck()
        assert stopped.returncode != 0, stopped.stdout
    finally:
        agent.terminate()


def test_entrypoint_without_the_secret_file_fails_loudly(tmp_path):
    agent = ContainerAgent(tmp_path / "container")
    env = agent.environment()
    env["OXIDE_CLUSTER_SECRET_FILE"] = str(tmp_path / "missing")
    env["OXIDE_REDIS_URL"] = "redis://127.0.0.1:1/0"
    agent.home.mkdir(parents=True)
    result = subprocess.run(agent.argv(), env=env, cwd=agent.home, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode != 0
    assert "secret_file" in result.stdout + result.stderr
    assert not os.path.exists(agent.state_dir / "secret"), "must not invent a secret"

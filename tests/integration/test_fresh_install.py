"""What a new user does: a fresh virtualenv, the pinned runtime install, a node, one task.

Runs outside the checkout (no ``PYTHONPATH``, ``cwd`` elsewhere), so it sees only what
``pip install -c requirements.txt .`` put into the virtualenv: the wheel's files, the
``twistd`` plugin and the ``oxide-cluster`` console script.
"""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, SECRET, free_port, http, poll_until

INSTALL_TIMEOUT = 600


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_runtime_pins_are_the_test_pins_subset():
    runtime = _pins(REPO_ROOT / "requirements.txt")
    everything = _pins(REPO_ROOT / "constraints.txt")
    assert {"twisted", "klein", "autobahn", "txredisapi", "psutil", "attrs"} <= set(runtime)
    assert {"pytest", "pytest-twisted", "hypothesis", "schemathesis"} <= set(everything)
    differing = {name: (version, everything.get(name)) for name, version in runtime.items()
                 if everything.get(name) != version}
    assert differing == {}


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("fresh-venv")
    venv.EnvBuilder(with_pip=True, clear=True).create(home / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run(
        [str(home / "venv/bin/pip"), "install", "-q", "-c", str(REPO_ROOT / "requirements.txt"),
         str(REPO_ROOT)],
        check=True, cwd=home, env=env, timeout=INSTALL_TIMEOUT)
    return home


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("OXIDE_")}
    env["HOME"] = str(home)
    env["PATH"] = f"{home / 'venv/bin'}:{env.get('PATH', '')}"
    return env


def test_fresh_install_has_the_plugin_and_runs_a_task(fresh_venv: Path):
    home = fresh_venv
    env = _clean_env(home)
    bin_dir = home / "venv/bin"
    listing = subprocess.run([str(bin_dir / "twistd"), "--help"], capture_output=True,
                             text=True, env=env, cwd=home, timeout=60)
    assert "oxide-cluster" in listing.stdout, listing.stdout + listing.stderr

    # The installed code, not the checkout's: the venv's python imports it from site-packages.
    where = subprocess.run([str(bin_dir / "python"), "-c",
                            "import oxide_cluster; print(oxide_cluster.__file__)"],
                           capture_output=True, text=True, env=env, cwd=home, timeout=60)
    assert where.stdout.startswith(str(home / "venv")), where.stdout + where.stderr

    port = free_port()
    log_path = home / "agent.log"
    with open(log_path, "wb") as log:
        agent = subprocess.Popen(
            [str(bin_dir / "twistd"), "-n", "--pidfile=", "oxide-cluster",
             "--listen", f"tcp:{port}:interface=127.0.0.1", "--state-dir", str(home / "state"),
             "--no-discovery", "--secret", SECRET],
            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if agent.poll() is not None:
                raise AssertionError(f"agent exited {agent.returncode}:\n"
                                     + log_path.read_text(errors="replace"))
            try:
                return http("GET", url + "/ready").status == 200
            except OSError:
                return False

        poll_until(ready, 30, message="the freshly installed agent to be ready")
        # The wheel carries the dashboard's files (setup.cfg's package data).
        for page in ("/ui/", "/ui/app.js", "/ui/style.css"):
            assert http("GET", url + page, secret=None).status == 200, page
        run = subprocess.run(
            [str(bin_dir / "oxide-cluster"), "run", "--node", url, "--secret", SECRET, "--",
             "sh", "-c", "echo fresh-install; exit 3"],
            capture_output=True, text=True, env=env, cwd=home, timeout=60)
        assert run.returncode == 3, run.stdout + run.stderr
        assert "fresh-install" in run.stdout
    finally:
        agent.terminate()
        agent.wait(30)

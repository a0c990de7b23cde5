"""Who this node is: a stable node id, the state dir it owns, and the cluster secret."""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
from pathlib import Path

from twisted.logger import Logger

from oxide_cluster.config import Config, ConfigError

log = Logger()


def prepare_state_dir(state_dir: Path) -> None:
    """Create the state dir (0700) or fail with a message an operator can act on."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = state_dir.stat()
        if info.st_mode & 0o077 and info.st_uid == os.geteuid():
            state_dir.chmod(0o700)  # the secret and every task's output are inside
    except OSError as error:
        raise ConfigError(f"cannot create state_dir {state_dir}: {error.strerror}") from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"state_dir {state_dir} is not writable by this user")


class StateDirLock:
    """An exclusive lock on the state dir: two agents must never share one store."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "agent.lock"
        self._handle: int | None = None

    def acquire(self) -> None:
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise ConfigError(f"state_dir {self.path.parent} is in use by another agent "
                              "(give each agent its own --state-dir)") from None
        os.set_inheritable(handle, False)
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            os.close(self._handle)
            self._handle = None


def load_node_id(state_dir: Path) -> str:
    """The node id persisted in the state dir, created on first start."""
    path = state_dir / "node_id"
    try:
        node_id = path.read_text().strip()
    except FileNotFoundError:
        node_id = ""
    if not node_id:
        node_id = f"{socket.gethostname().split('.')[0]}-{secrets.token_hex(4)}"
        path.write_text(node_id + "\n")
    return node_id


def resolve_secret(config: Config) -> str:
    """The cluster secret from config, a file, or (standalone only) generated once."""
    if config.secret:
        return config.secret
    if config.secret_file:
        try:
            secret = Path(config.secret_file).read_text().strip()
        except OSError as error:
            raise ConfigError(f"cannot read secret_file {config.secret_file}: "
                              f"{error.strerror}") from None
        if not secret:
            raise ConfigError(f"secret_file {config.secret_file} is empty")
        return secret
    if config.clustered:
        raise ConfigError("a multi-node cluster needs a shared secret: set "
                          "OXIDE_CLUSTER_SECRET, --secret-file or --secret")
    path = config.state_dir / "secret"
    if path.exists():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    log.warn("no cluster secret configured: generated one in {path} (mode 0600)", path=path)
    return secret

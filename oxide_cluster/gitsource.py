"""Git sources: a task's directory checked out at a revision through a per-node mirror.

A task with ``source: {"git": URL, "ref": REV}`` gets its directory from
``<state_dir>/git/<sha256 of URL>``, a ``git clone --mirror`` made once per URL and
brought up to date with ``git fetch`` (so a second checkout of the same repository
fetches only new objects), then ``git clone --shared --no-checkout`` into the task
directory and a detached checkout of the commit REV names. git runs as a child process
(``getProcessOutputAndValue``), never on the reactor thread; one operation per mirror
at a time. Only https, ssh, git and local-path URLs are allowed (``GIT_ALLOW_PROTOCOL``):
``ext::`` and other remote helpers could run commands.

Mirrors are bounded (config ``git_cache`` bytes and ``git_cache_age`` seconds): after
each checkout, mirrors unused for ``max_age`` go, then the least recently used until the
rest fit in ``limit``. A mirror a checkout or a running task uses (the task's clone
borrows its objects) is never pruned.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import defer, utils
from twisted.logger import Logger

T = TypeVar("T")

ALLOWED_PROTOCOLS = "https:ssh:git:file"
_SCHEME_URL = re.compile(r"^(https|ssh|git)://[^\s]+$")
_SCP_URL = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^\s]+$")
_REF = re.compile(r"^[^\s\x00-\x1f\x7f~^:?*\[\\]+$")
MAX_REF = 256


class SourceError(ValueError):
    """A bad ``source`` field, or git failed; the message is the reason."""


def check_source(source: object) -> dict[str, str]:
    """``{"git": URL, "ref": REV}`` checked: a URL git may fetch without helpers, and a
    revision that cannot be read as an option."""
    if not isinstance(source, dict) or set(source) != {"git", "ref"}:
        raise SourceError('must be {"git": URL, "ref": REV}')
    url, ref = source["git"], source["ref"]
    if not isinstance(url, str) or not (
            _SCHEME_URL.match(url) or _SCP_URL.match(url)
            or (os.path.isabs(url) and "::" not in url and "\0" not in url)):
        raise SourceError("git must be an https://, ssh://, git:// or user@host:path URL "
                          "or an absolute path (no transport helpers such as ext::)")
    if not isinstance(ref, str) or len(ref) > MAX_REF or ref.startswith("-") \
            or ".." in ref or not _REF.match(ref):
        raise SourceError("ref must be a branch, tag or commit (not starting with '-', "
                          "no spaces, '..' or revision operators)")
    return {"git": url, "ref": ref}


def _mirror_sizes(root: Path) -> list[tuple[float, str, int]]:
    """(last use, name, bytes) of each mirror (and leftover ``.partial`` clone)."""
    found = []
    try:
        listed = list(os.scandir(root))
    except FileNotFoundError:
        return []
    for entry in listed:
        if not entry.is_dir(follow_symlinks=False):
            continue
        size = 0
        for directory, _, filenames in os.walk(entry.path):
            for name in filenames:
                try:
                    size += os.lstat(os.path.join(directory, name)).st_size
                except OSError:
                    continue
        found.append((entry.stat(follow_symlinks=False).st_mtime, entry.name, size))
    return sorted(found)


class GitMirrors:
    """Per-node mirrors of git repositories, and checkouts from them."""

    log = Logger()

    def __init__(self, reactor: Any, root: Path, git: str = "git", *,
                 limit: int = 2 * 1024 ** 3, max_age: float = 30 * 86400.0,
                 offload: Callable[[Callable[[], Any]], defer.Deferred[Any]] | None = None
                 ) -> None:
        self._reactor = reactor
        self.root = root
        self._git = git
        self._locks: dict[str, defer.DeferredLock] = {}
        self._users: dict[str, int] = {}  # mirror name: checkouts and tasks using it
        self.limit = limit
        self.max_age = max_age
        self._offload = offload or (lambda function: defer.maybeDeferred(function))
        self.fetches = 0  # mirror updates (not first clones) since start
        self.clones = 0
        self.pruned = 0

    def release(self, url: str) -> None:
        """A task whose directory was checked out from ``url``'s mirror has ended."""
        name = self.mirror_path(url).name
        count = self._users.get(name, 0) - 1
        if count > 0:
            self._users[name] = count
        else:
            self._users.pop(name, None)

    async def prune(self, now: float | None = None) -> list[str]:
        """Remove mirrors unused for ``max_age``, then the least recently used until the
        rest fit in ``limit``; never one in use. The names removed."""
        found = await self._offload(lambda: _mirror_sizes(self.root))
        now = time.time() if now is None else now
        total = sum(size for _, _, size in found)
        doomed = []
        for last_used, name, size in found:  # oldest first
            if self._users.get(name.removesuffix(".partial")):
                continue
            if now - last_used > self.max_age or total > self.limit:
                doomed.append(name)
                total -= size
        if doomed:
            paths = [self.root / name for name in doomed]

            def remove() -> None:
                for path in paths:
                    shutil.rmtree(path, ignore_errors=True)

            await self._offload(remove)
            self.pruned += len(doomed)
            self.log.info("git mirrors pruned: {names} (git_cache {limit} bytes, "
                          "git_cache_age {age} s)", names=doomed, limit=self.limit,
                          age=self.max_age)
        return doomed

    def mirror_path(self, url: str) -> Path:
        return self.root / hashlib.sha256(url.encode()).hexdigest()[:32]

    async def _run(self, *args: str, cwd: Path | None = None) -> str:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_TERMINAL_PROMPT": "0",
               "GIT_ALLOW_PROTOCOL": ALLOWED_PROTOCOLS, "HOME": str(self.root),
               "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"}
        if "SSH_AUTH_SOCK" in os.environ:
            env["SSH_AUTH_SOCK"] = os.environ["SSH_AUTH_SOCK"]
        out, err, code = await utils.getProcessOutputAndValue(
            self._git, ("-c", "gc.auto=0", *args), env=env,
            path=str(cwd) if cwd else None, reactor=self._reactor)
        if code != 0:
            message = (err or out).decode("utf-8", "replace").strip().splitlines()
            verb = next(arg for arg in args if not arg.startswith("-") and "/" not in arg)
            raise SourceError(f"git {verb} failed: {' / '.join(message[-3:])}")
        return str(out.decode("utf-8", "replace"))

    async def checkout(self, url: str, ref: str, target: Path, private: bool = False) -> str:
        """Clone or update the mirror of ``url``, then check REV out into ``target``
        (which must not exist). Returns the commit. Raises SourceError with git's
        message. ``private``: the checkout copies the objects it needs instead of
        borrowing the mirror's (a ``run_as`` user cannot read the state dir)."""
        mirror = self.mirror_path(url)
        lock = self._locks.setdefault(url, defer.DeferredLock())
        self._users[mirror.name] = self._users.get(mirror.name, 0) + 1  # until release
        try:
            commit = await self._checkout(url, ref, target, mirror, lock, private)
        except BaseException:
            self.release(url)
            raise
        os.utime(mirror)  # its last use, for prune
        pruning = defer.Deferred.fromCoroutine(self.prune())
        pruning.addErrback(lambda failure: self.log.failure("cannot prune git mirrors",
                                                            failure))
        return commit

    async def _checkout(self, url: str, ref: str, target: Path, mirror: Path,
                        lock: defer.DeferredLock, private: bool) -> str:
        await lock.acquire()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if (mirror / "HEAD").exists():
                await self._run("--git-dir", str(mirror), "fetch", "--prune", "--tags",
                                "origin")
                self.fetches += 1
            else:
                partial = mirror.with_name(mirror.name + ".partial")
                await self._run("clone", "--mirror", "--quiet", "--", url, str(partial))
                os.replace(partial, mirror)
                self.clones += 1
            try:
                commit = (await self._run("--git-dir", str(mirror), "rev-parse", "--verify",
                                          "--quiet", "--end-of-options",
                                          f"{ref}^{{commit}}")).strip()
            except SourceError:
                raise SourceError(f"ref {ref!r} is not a commit in {url}") from None
            # --shared: the task's clone borrows the mirror's objects (no copy); gc.auto
            # is off on every command so a fetch never prunes what a checkout borrows.
            dissociate = ("--dissociate",) if private else ()
            await self._run("clone", "--shared", *dissociate, "--no-checkout", "--quiet",
                            "--", str(mirror), str(target))
            await self._run("checkout", "--quiet", "--detach", commit, cwd=target)
            return commit
        finally:
            lock.release()

"""Just enough of a Dockerfile parser to test what the image would run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import attrs

from tests.support import REPO_ROOT

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"


@attrs.define
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = attrs.Factory(list)

    def all(self, keyword: str) -> list[str]:
        return [args for word, args in self.instructions if word == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {args!r}: use the key=value form"
                values[key] = value
        return values

    def exec_form(self, keyword: str) -> list[str]:
        """A JSON (exec form) ENTRYPOINT/CMD; the shell form would lose signals."""
        raw = self.last(keyword)
        assert raw is not None, f"no {keyword}"
        value = json.loads(raw)
        assert isinstance(value, list), f"{keyword} must be the exec (JSON list) form"
        return value

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        raw = self.last("HEALTHCHECK")
        assert raw is not None, "no HEALTHCHECK"
        options: dict[str, str] = {}
        rest = raw
        while rest.startswith("--"):
            option, _, rest = rest.partition(" ")
            key, _, value = option[2:].partition("=")
            options[key] = value
            rest = rest.lstrip()
        keyword, _, command = rest.partition(" ")
        assert keyword == "CMD", raw
        return options, json.loads(command)


def parse(path: Path = DOCKERFILE) -> list[Stage]:
    """Stages in order; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        word, _, args = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        else:
            assert stages, "instruction before FROM"
            stages[-1].instructions.append((word, args.strip()))
    return stages


def runtime() -> Stage:
    return parse()[-1]


def container_command() -> list[str]:
    """What ``docker run IMAGE`` executes: ENTRYPOINT + CMD, without the init (tini)."""
    stage = runtime()
    command = stage.exec_form("ENTRYPOINT") + stage.exec_form("CMD")
    if command[:2] == ["tini", "--"]:
        command = command[2:]
    return command

"""Workspace manifests: the one encoder and the one parser, shared by client and node.

A manifest lists a tree's files (path, mode, size, SHA-256 digest) and its symlinks, as
canonical JSON (sorted keys, no spaces), so the same tree always gives the same bytes and
the manifest can be addressed by its own digest like any blob. Everything in it is hostile
until :func:`parse_manifest` has checked it: relative normalised paths, no ``..``, no
duplicates, regular files and symlinks only, symlinks that resolve inside the tree.
Standard library only: the CLI imports it on CI hosts.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import stat
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii
from typing import Any

import attrs

MANIFEST_VERSION = 1
MAX_ENTRIES = 1_000_000
MAX_PATH = 4096
_DIGEST = re.compile(r"[0-9a-f]{64}")  # fullmatch: "$" would let a trailing newline by
# Symlink hops followed while checking a target before calling it a loop (as Linux does).
_MAX_HOPS = 40
_FILE_FIELDS = frozenset({"type", "path", "mode", "size", "digest"})
_LINK_FIELDS = frozenset({"type", "path", "target"})
_PLAIN_MODES = frozenset({0o644, 0o755})  # what normal_mode gives, as clients write them


class ManifestError(ValueError):
    """A manifest (or a path in one) is refused; the message says which entry and why."""


def is_digest(value: object) -> bool:
    """A lowercase hex SHA-256, the only blob name the store accepts."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_relative_path(path: object, what: str = "path") -> str:
    """A relative, normalised POSIX path inside a tree, or ManifestError saying why not."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{what} must be a non-empty string")
    if "\x00" in path:
        raise ManifestError(f"{what} {path!r} contains a NUL byte")
    # At most 4 UTF-8 bytes a character: only a long path needs encoding to be measured.
    if len(path) > MAX_PATH // 4 and len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise ManifestError(f"{what} {path[:80]!r}... is longer than {MAX_PATH} bytes")
    if path[0] == "/":
        raise ManifestError(f"{what} {path!r} is absolute")
    parts = path.split("/")
    if ".." in parts:
        raise ManifestError(f"{what} {path!r} contains '..'")
    if "" in parts or "." in parts:
        raise ManifestError(f"{what} {path!r} is not normalised (empty or '.' component)")
    return path


def normal_mode(mode: int) -> int:
    """0o755 for an executable file, else 0o644: only the execute bit travels, so a
    tree's manifest (and digest) does not change with the uploader's umask."""
    return 0o755 if mode & 0o111 else 0o644


@attrs.frozen
class FileEntry:
    path: str
    mode: int
    size: int
    digest: str


@attrs.frozen
class LinkEntry:
    path: str
    target: str


@attrs.frozen
class Manifest:
    """A checked manifest: files and symlinks, sorted by path."""

    files: tuple[FileEntry, ...]
    links: tuple[LinkEntry, ...] = ()
    # The canonical bytes when already known (build_manifest made them), so a client
    # encodes its manifest once; not part of equality.
    _encoded: bytes | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)

    def digests(self) -> set[str]:
        return {entry.digest for entry in self.files}

    def encode(self) -> bytes:
        """The canonical bytes; their SHA-256 is the manifest's address."""
        if self._encoded is not None:
            return self._encoded
        # What json.dumps(sort_keys=True, separators=(",", ":")) writes for a checked
        # manifest (strings through json's own escaping, whole numbers), made without a
        # dict per entry: keys in sorted order, entries sorted by path.
        quote = encode_basestring_ascii
        entries = [(f.path, f'{{"digest":{quote(f.digest)},"mode":{f.mode:d},'
                            f'"path":{quote(f.path)},"size":{f.size:d},"type":"file"}}')
                   for f in self.files]
        entries += [(link.path, f'{{"path":{quote(link.path)},'
                                f'"target":{quote(link.target)},"type":"symlink"}}')
                    for link in self.links]
        entries.sort()
        return (f'{{"entries":[{",".join(entry for _, entry in entries)}],'
                f'"version":{MANIFEST_VERSION}}}').encode()

    def digest(self) -> str:
        return digest_bytes(self.encode())


def build_manifest(files: Iterable[FileEntry], links: Iterable[LinkEntry] = ()) -> Manifest:
    """Check entries made by a client exactly as a node will (the parser's own checks
    of each field and of the tree, without a JSON round trip), and sort them. The result
    keeps its canonical bytes, so they are encoded once."""
    checked = _checked_tree(
        [_checked_file(check_relative_path(f.path), f.mode, f.size, f.digest) for f in files],
        [_checked_link(check_relative_path(link.path), link.target) for link in links])
    return Manifest(checked.files, checked.links, checked.encode())


def _file_entry(index: int, entry: dict[str, Any]) -> FileEntry:
    path = check_relative_path(entry.get("path"), f"entry {index} path")
    if not entry.keys() <= _FILE_FIELDS:
        extra = sorted(set(entry) - _FILE_FIELDS)
        raise ManifestError(f"entry {path!r}: unknown field {extra[0]!r}")
    return _checked_file(path, entry.get("mode"), entry.get("size"), entry.get("digest"))


def _checked_file(path: str, mode: object, size: object, digest: object) -> FileEntry:
    """A file entry from its fields (``path`` checked already); the mode normalised."""
    if type(mode) is int and mode in _PLAIN_MODES \
            and type(size) is int and size >= 0 and is_digest(digest):
        assert isinstance(digest, str)
        return FileEntry(path, mode, size, digest)  # the usual entry, checked at once
    if isinstance(mode, bool) or not isinstance(mode, int) or mode < 0:
        raise ManifestError(f"entry {path!r}: mode must be a whole number")
    kind = stat.S_IFMT(mode)
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        raise ManifestError(f"entry {path!r}: names a device; only files and symlinks")
    if kind == stat.S_IFIFO:
        raise ManifestError(f"entry {path!r}: names a FIFO; only files and symlinks")
    if kind not in (0, stat.S_IFREG) or mode & ~0o777 & ~stat.S_IFREG:
        raise ManifestError(f"entry {path!r}: mode {mode:o} is not a plain file mode "
                            "(no setuid, setgid, sticky or special types)")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ManifestError(f"entry {path!r}: size must be a whole number >= 0")
    if not is_digest(digest):
        raise ManifestError(f"entry {path!r}: digest must be 64 lowercase hex characters "
                            "(SHA-256)")
    assert isinstance(digest, str)
    return FileEntry(path, normal_mode(mode), size, digest)


def _link_entry(index: int, entry: dict[str, Any]) -> LinkEntry:
    path = check_relative_path(entry.get("path"), f"entry {index} path")
    if not entry.keys() <= _LINK_FIELDS:
        extra = sorted(set(entry) - _LINK_FIELDS)
        raise ManifestError(f"entry {path!r}: unknown field {extra[0]!r}")
    return _checked_link(path, entry.get("target"))


def _checked_link(path: str, target: object) -> LinkEntry:
    """A symlink entry from its fields (``path`` checked already)."""
    if not isinstance(target, str) or not target or "\x00" in target:
        raise ManifestError(f"symlink {path!r}: target must be a non-empty string")
    if target.startswith("/"):
        raise ManifestError(f"symlink {path!r}: target {target!r} is absolute")
    return LinkEntry(path, target)


def _resolve(path: str, links: dict[str, str], hops: list[int]) -> list[str]:
    """The components ``path`` resolves to inside the tree, following the tree's own
    symlinks; ManifestError if it leaves the tree or loops."""
    resolved: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                raise ManifestError("escapes the tree")
            resolved.pop()
            continue
        resolved.append(part)
        target = links.get("/".join(resolved))
        if target is not None:
            hops[0] += 1
            if hops[0] > _MAX_HOPS:
                raise ManifestError("is a symlink loop")
            resolved.pop()
            base = "/".join(resolved)
            resolved = _resolve(posixpath.join(base, target) if base else target, links, hops)
    return resolved


def parse_manifest(raw: bytes) -> Manifest:
    """The one parser of manifests; raises ManifestError naming the entry and the reason."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        raise ManifestError(f"manifest is not JSON: {error}") from None
    except RecursionError:
        raise ManifestError("manifest is nested too deeply") from None
    if not isinstance(body, dict):
        raise ManifestError("manifest must be a JSON object")
    if body.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"manifest version {body.get('version')!r} is not supported "
                            f"(this node reads version {MANIFEST_VERSION})")
    extra = sorted(set(body) - {"version", "entries"})
    if extra:
        raise ManifestError(f"manifest has an unknown field {extra[0]!r}")
    entries = body.get("entries")
    if not isinstance(entries, list):
        raise ManifestError("manifest entries must be a list")
    if len(entries) > MAX_ENTRIES:
        raise ManifestError(f"manifest has more than {MAX_ENTRIES} entries")
    files: list[FileEntry] = []
    links: list[LinkEntry] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ManifestError(f"entry {index} must be an object")
        kind = entry.get("type")
        if kind == "file":
            parsed: FileEntry | LinkEntry = _file_entry(index, entry)
        elif kind == "symlink":
            parsed = _link_entry(index, entry)
        elif kind in ("fifo", "device", "char", "block", "socket"):
            raise ManifestError(f"entry {entry.get('path')!r}: names a {kind}; only files "
                                "and symlinks")
        else:
            raise ManifestError(f"entry {index}: type must be 'file' or 'symlink', "
                                f"not {kind!r}")
        if isinstance(parsed, FileEntry):
            files.append(parsed)
        else:
            links.append(parsed)
    return _checked_tree(files, links)


def _checked_tree(files: list[FileEntry], links: list[LinkEntry]) -> Manifest:
    """Entries checked one by one, checked as a tree: no path twice, every ancestor a
    directory, every symlink resolving inside the tree. Sorted."""
    seen = {entry.path for entry in files}
    seen.update(link.path for link in links)
    if len(seen) < len(files) + len(links):
        counted: set[str] = set()
        every: list[FileEntry | LinkEntry] = [*files, *links]
        for entry in every:
            if entry.path in counted:
                raise ManifestError(f"entry {entry.path!r}: duplicate path")
            counted.add(entry.path)
    link_targets = {link.path: link.target for link in links}
    directories: set[str] = set()  # ancestors found to be directories, with theirs
    for path in seen:
        # Every ancestor must be a directory: not a file, not a symlink (writing under a
        # symlink would write wherever it points).
        parent = path.rpartition("/")[0]  # paths are checked normalised: their dirname
        while parent and parent not in directories:
            if parent in link_targets:
                raise ManifestError(f"entry {path!r}: lies under the symlink {parent!r}")
            if parent in seen:
                raise ManifestError(f"entry {path!r}: its parent {parent!r} is a file")
            directories.add(parent)
            parent = parent.rpartition("/")[0]
    for link in links:
        try:
            _resolve(link.path, link_targets, [0])
        except ManifestError as error:
            raise ManifestError(f"symlink {link.path!r} -> {link.target!r}: {error}") from None
    files.sort(key=lambda f: f.path)
    links.sort(key=lambda link: link.path)
    return Manifest(tuple(files), tuple(links))


def check_glob(pattern: object) -> str:
    """An artifact glob relative to the task directory; no way out of it (``..``, ``/``)."""
    if not isinstance(pattern, str) or not pattern:
        raise ManifestError("an artifact glob must be a non-empty string")
    if "\x00" in pattern:
        raise ManifestError(f"artifact glob {pattern!r} contains a NUL byte")
    if pattern.startswith("/") or pattern.startswith("~"):
        raise ManifestError(f"artifact glob {pattern!r} is absolute: globs are relative "
                            "to the task directory")
    if ".." in pattern.split("/"):
        raise ManifestError(f"artifact glob {pattern!r} contains '..': it would escape "
                            "the task directory")
    if len(pattern) > MAX_PATH:
        raise ManifestError(f"artifact glob is longer than {MAX_PATH} characters")
    return pattern


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over relative paths: ``*`` and ``?`` stay within one directory, a ``**``
    segment matches any number of directories (``**/junit.xml``, ``reports/**``)."""
    parts = []
    segments = check_glob(pattern).split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            parts.append(".*" if last else "(?:[^/]+/)*")
            continue
        out, i = [], 0
        while i < len(segment):
            char = segment[i]
            if char == "*":
                out.append("[^/]*")
            elif char == "?":
                out.append("[^/]")
            elif char == "[" and segment.find("]", i + 2) != -1:
                end = segment.find("]", i + 2)
                body = segment[i + 1:end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"(?!/)[{body}]")
                i = end
            else:
                out.append(re.escape(char))
            i += 1
        parts.append("".join(out) + ("" if last else "/"))
    return re.compile("".join(parts) + r"\Z", re.DOTALL)

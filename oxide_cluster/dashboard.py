"""The static files of the browser dashboard (``/ui/``), served without the secret.

They hold no data: every call the page makes for data carries the secret. So that an
unauthenticated route can never leak anything else, only the regular files that sit
directly in ``oxide_cluster/ui`` are served, looked up by exact name: no directory
listings, no subdirectories, no ``..``, no symlinks. Content types are fixed (browsers
refuse ES modules without a JavaScript type) and headers stop sniffing, framing and
stale code after an upgrade. The files are a few kilobytes, so they are read whole
instead of streamed (``static.File``'s pull producer buys nothing here).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from twisted.web.resource import Resource

UI_DIR = Path(__file__).resolve().parent / "ui"

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
}

# Same origin only: the page talks to its own node over fetch and ws(s)://.
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _common_headers(request: Any) -> None:
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"Cache-Control", b"no-cache")


class NotFound(Resource):
    """A 404 in the API's error shape, so every route fails alike."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"application/json")
        _common_headers(request)
        body = {"error": {"code": "not_found", "message": "no such dashboard file"}}
        return json.dumps(body).encode() + b"\n"


class UiFile(Resource):
    """One dashboard file, read at request time (edits show up without a restart)."""

    isLeaf = True

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def render_GET(self, request: Any) -> bytes:
        if request.postpath:  # /ui/app.js/anything
            return NotFound().render(request)
        try:
            body = self.path.read_bytes()
        except OSError:
            return NotFound().render(request)
        etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
        _common_headers(request)
        request.setHeader(b"Content-Type", CONTENT_TYPES[self.path.suffix])
        request.setHeader(b"Content-Security-Policy", CSP)
        request.setHeader(b"ETag", etag)
        if request.getHeader(b"if-none-match") == etag:
            request.setResponseCode(304)
            return b""
        return body


class UiFiles(Resource):
    """The ``/ui/`` directory: exact names of regular files with a known type, or 404."""

    def __init__(self, directory: Path = UI_DIR) -> None:
        super().__init__()
        self.directory = directory

    def served_names(self) -> set[str]:
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return set()
        return {entry.name for entry in entries
                if entry.is_file(follow_symlinks=False) and not entry.name.startswith(".")
                and Path(entry.name).suffix in CONTENT_TYPES}

    def getChild(self, path: bytes, request: Any) -> Resource:
        name = path.decode("utf-8", "replace") or "index.html"
        if name not in self.served_names():
            return NotFound()
        return UiFile(self.directory / name)

    def render(self, request: Any) -> bytes:
        return NotFound().render(request)

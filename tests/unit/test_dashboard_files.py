"""The /ui static route: served without the secret, and nothing but the dashboard's files."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from treq.testing import StubTreq

from oxide_cluster.api import TaskApi
from oxide_cluster.dashboard import UI_DIR


@pytest.fixture
def client() -> StubTreq:
    node = SimpleNamespace(secret="s3cret", executor=SimpleNamespace(state_listeners=[]))
    return StubTreq(TaskApi(node).resource())  # type: ignore[arg-type]


def fetch(client: StubTreq, path: str, **kwargs) -> tuple[int, dict[str, list[str]], bytes]:
    """One request through the in-memory transport; returns status, headers and body."""
    replies: list = []
    client.get("http://node" + path, allow_redirects=False, **kwargs).addBoth(replies.append)
    client.flush()
    reply = replies[0]
    bodies: list = []
    reply.content().addBoth(bodies.append)
    client.flush()
    headers = {k.decode().lower(): [v.decode() for v in vs]
               for k, vs in reply.headers.getAllRawHeaders()}
    return reply.code, headers, bodies[0]


def test_ui_serves_index_html_without_the_secret(client) -> None:
    status, headers, body = fetch(client, "/ui/")
    assert status == 200
    assert headers["content-type"] == ["text/html; charset=utf-8"]
    assert body == (UI_DIR / "index.html").read_bytes()
    assert headers["x-content-type-options"] == ["nosniff"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"][0]


@pytest.mark.parametrize(("name", "content_type"), [
    ("app.js", "text/javascript; charset=utf-8"),  # ES modules need a JavaScript type
    ("style.css", "text/css; charset=utf-8"),
    ("index.html", "text/html; charset=utf-8"),
])
def test_ui_files_have_fixed_content_types(client, name: str, content_type: str) -> None:
    status, headers, body = fetch(client, f"/ui/{name}")
    assert status == 200
    assert headers["content-type"] == [content_type]
    assert body == (UI_DIR / name).read_bytes()


@pytest.mark.parametrize("path", ["/", "/ui"])
def test_root_and_bare_ui_redirect_to_the_dashboard(client, path: str) -> None:
    status, headers, _ = fetch(client, path)
    assert status == 302
    assert headers["location"] == ["/ui/"]


@pytest.mark.parametrize("path", [
    "/ui/../api.py", "/ui/%2e%2e/api.py", "/ui/..%2fapi.py", "/ui/..%2F..%2Foxide.sqlite3",
    "/ui/../../state/oxide.sqlite3", "/ui//etc/passwd", "/ui/%2fetc%2fpasswd",
    "/ui/.", "/ui/a%00b",
])
def test_traversal_out_of_the_ui_dir_is_refused(client, path: str) -> None:
    status, headers, body = fetch(client, path)
    assert status == 404
    assert headers["content-type"] == ["application/json"]
    assert b"not_found" in body


@pytest.mark.parametrize("path", ["/ui/nope.js", "/ui/app.js/extra", "/ui/__pycache__",
                                  "/ui/INDEX.HTML"])
def test_unknown_dashboard_files_are_404(client, path: str) -> None:
    status, _, body = fetch(client, path)
    assert status == 404
    assert b"not_found" in body


def test_unchanged_file_answers_304_to_its_etag(client) -> None:
    _, headers, _ = fetch(client, "/ui/app.js")
    status, _, body = fetch(client, "/ui/app.js", headers={"If-None-Match": headers["etag"][0]})
    assert (status, body) == (304, b"")


def test_data_routes_still_need_the_secret(client) -> None:
    status, _, body = fetch(client, "/api/cluster/nodes")
    assert status == 401
    assert b"unauthorized" in body


def test_only_served_files_are_in_the_ui_dir() -> None:
    """Anything added to oxide_cluster/ui is public: keep it to the page's own files."""
    names = {path.name for path in UI_DIR.iterdir()}
    assert names == {"index.html", "app.js", "style.css"}

"""The OpenAPI document stays true to the Klein routes, and is served without the secret."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from openapi_spec_validator import validate
from treq.testing import StubTreq

from oxide_cluster.api import TaskApi
from oxide_cluster.openapi import document

# HTTP methods Klein/werkzeug may list; HEAD rides along with every GET rule.
_METHODS = {"get", "post", "put", "patch", "delete", "options"}


def routes_of_the_app() -> set[tuple[str, str]]:
    """(OpenAPI path, method) for every werkzeug rule of the app."""
    found = set()
    for rule in TaskApi.app.url_map.iter_rules():
        # <task_id> -> {task_id}; the /ui/ branch's catch-all is the static file route.
        path = re.sub(r"<(?:[a-z]+(?:\([^)]*\))?:)?([a-z_]+)>", r"{\1}", rule.rule)
        path = path.replace("{__rest__}", "{file}")
        methods = {m.lower() for m in rule.methods or ()} & _METHODS
        if not rule.methods:  # /ws takes any method; only GET can be an upgrade
            methods = {"get"}
        found |= {(path, method) for method in methods}
    return found


def routes_of_the_document() -> set[tuple[str, str]]:
    return {(path, method) for path, item in document()["paths"].items()
            for method in item if method in _METHODS}


def test_document_is_valid_openapi() -> None:
    validate(document())


def test_document_lists_exactly_the_routes_of_the_app() -> None:
    assert routes_of_the_document() == routes_of_the_app()


def test_every_operation_but_the_public_ones_needs_the_secret() -> None:
    public = {"/health", "/openapi.json", "/", "/ui", "/ui/", "/ui/{file}"}
    for path, method in routes_of_the_document():
        operation = document()["paths"][path][method]
        if path in public:
            assert operation["security"] == [], path
        else:
            assert operation.get("security", document()["security"]), path
            assert "401" in operation["responses"], (path, method)


@pytest.fixture
def client() -> StubTreq:
    node = SimpleNamespace(secret="s3cret", executor=SimpleNamespace(state_listeners=[]),
                           config=SimpleNamespace(max_timeout=600.0))
    return StubTreq(TaskApi(node).resource())  # type: ignore[arg-type]


def test_openapi_json_is_served_without_the_secret(client) -> None:
    replies: list = []
    client.get("http://node/openapi.json").addBoth(replies.append)
    client.flush()
    bodies: list = []
    replies[0].content().addBoth(bodies.append)
    client.flush()
    assert replies[0].code == 200
    served = json.loads(bodies[0])
    assert served == document(max_timeout=600.0)
    request_fields = served["components"]["schemas"]["TaskRequest"]["properties"]
    assert request_fields["timeout"]["maximum"] == 600.0  # the node's own limit


@pytest.mark.parametrize(("headers", "status"), [({}, 401),
                                                 ({"X-Cluster-Secret": "wrong"}, 401),
                                                 ({"X-Cluster-Secret": "s3cret"}, 426)])
def test_ws_without_an_upgrade_is_refused_not_served_a_page(headers, status) -> None:
    node = SimpleNamespace(secret="s3cret", executor=SimpleNamespace(state_listeners=[]))
    client = StubTreq(TaskApi(node, websocket=object()).resource())  # type: ignore[arg-type]
    replies: list = []
    client.get("http://node/ws", headers=headers).addBoth(replies.append)
    client.flush()
    bodies: list = []
    replies[0].content().addBoth(bodies.append)
    client.flush()
    assert replies[0].code == status
    assert json.loads(bodies[0])["error"]["code"] in ("unauthorized", "upgrade_required")


@pytest.mark.parametrize("path", ["/task/%FF", "/task/%ED%A0%80/output", "/%C0%AF"])
def test_a_path_that_is_not_utf8_is_a_400_in_the_error_shape(client, path) -> None:
    replies: list = []
    client.get("http://node" + path).addBoth(replies.append)
    client.flush()
    bodies: list = []
    replies[0].content().addBoth(bodies.append)
    client.flush()
    assert replies[0].code == 400
    assert json.loads(bodies[0])["error"]["code"] == "bad_path"

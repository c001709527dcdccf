"""The API document: it describes every route of the URL map and nothing else, it is valid
OpenAPI 3.1, and the service serves it as JSON and as a page that loads nothing."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from flask import Flask
from schemathesis.specs.openapi.definitions import OPENAPI_31

from service import create_app
from service.api_doc.document import build_document
from service.auth.schemas import Credentials, PasswordChange
from service.config import Settings
from service.oauth.clients import GRANT_TYPES
from service.oauth.scopes import SCOPES
from service.oauth.server import metadata

CONVERTER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def app(settings: Settings) -> Flask:
    """The application as production builds it (nothing is started)."""
    return create_app(settings)


@pytest.fixture(scope="module")
def document(settings: Settings) -> dict[str, Any]:
    """The document, as a client reads it."""
    built: dict[str, Any] = json.loads(json.dumps(build_document(settings.jwt_issuer)))
    return built


def routes(app: Flask) -> set[tuple[str, str]]:
    """(path, method) of every route, less the HEAD and OPTIONS Flask answers by itself."""
    found = set()
    for rule in app.url_map.iter_rules():
        implicit = {"HEAD"} if "GET" in (rule.methods or ()) else set()
        if getattr(rule, "provide_automatic_options", False):
            implicit.add("OPTIONS")
        path = CONVERTER.sub(r"{\1}", rule.rule)
        found |= {(path, method.lower()) for method in (rule.methods or set()) - implicit}
    return found


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(path, method, operation) of the document."""
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def test_every_route_is_documented_and_every_operation_is_a_route(
    app: Flask, document: dict[str, Any]
) -> None:
    served = routes(app)
    documented = {(path, method) for path, method, _ in operations(document)}
    assert served - documented == set(), "routes the document does not describe"
    assert documented - served == set(), "operations the service does not have"


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    errors = [e.message for e in jsonschema.Draft202012Validator(OPENAPI_31).iter_errors(document)]
    assert errors == []
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    def references(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from references(value)
        elif isinstance(node, list):
            for value in node:
                yield from references(value)

    found = list(references(document))
    assert found
    for target in found:
        node: Any = document
        for part in target.removeprefix("#/").split("/"):
            assert part in node, target
            node = node[part]


def test_every_operation_is_described_fully(document: dict[str, Any]) -> None:
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids))
    tags = {tag["name"] for tag in document["tags"]}
    for path, method, operation in operations(document):
        label = f"{method.upper()} {path}"
        assert operation["summary"] and operation["description"], label
        assert set(operation["tags"]) <= tags, label
        assert "security" in operation, label
        assert any(
            status.startswith("2") or status.startswith("3") for status in operation["responses"]
        ), label


def test_parts_come_from_the_code_they_describe(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["Credentials"] == Credentials.model_json_schema()
    assert schemas["PasswordChange"] == PasswordChange.model_json_schema()
    grants = [schemas[ref["$ref"].rsplit("/", 1)[1]] for ref in schemas["TokenRequest"]["oneOf"]]
    assert [grant["properties"]["grant_type"]["const"] for grant in grants] == list(GRANT_TYPES)
    issued = metadata(issuer="https://auth.example.com")
    assert set(schemas["ServerMetadata"]["required"]) == set(issued)
    flows = document["components"]["securitySchemes"]["oauth2"]["flows"]
    assert all(list(flow["scopes"]) == list(SCOPES) for flow in flows.values())


async def test_the_document_is_served(client: httpx.AsyncClient, settings: Settings) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == json.loads(json.dumps(build_document(settings.jwt_issuer)))
    assert response.json()["servers"] == [{"url": settings.jwt_issuer}]


async def test_the_page_shows_every_operation_and_loads_nothing(
    client: httpx.AsyncClient, document: dict[str, Any]
) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for path, method, operation in operations(document):
        assert f'id="{operation["operationId"]}"' in page, f"{method} {path}"
    for name in document["components"]["schemas"]:
        assert f'id="schema-{name}"' in page
    # Nothing fetched: no script, no external stylesheet, image or frame, links stay here.
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert re.findall(r'(?:src|href)="(?!#|openapi\.json")', page) == []
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "unsafe" not in policy
    styles = re.findall(r"<style>(.*?)</style>", page, flags=re.DOTALL)
    digests = {base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() for s in styles}
    assert digests and all(f"'sha256-{digest}'" in policy for digest in digests)
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["strict-transport-security"]
    head = await client.head("/docs")
    assert head.status_code == 200


def test_the_page_template_ships_with_the_package() -> None:
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '"api_doc/templates/*.html"' in pyproject

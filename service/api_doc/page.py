"""The document as a page: operations grouped by tag, with every reference resolved."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup, escape

Schema = dict[str, Any]
CODE_SPAN = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Body:
    """A request or response body in one media type."""

    media_type: str
    schema_name: str | None
    schema_text: str | None


@dataclass(frozen=True)
class Answer:
    """One response of an operation."""

    status: str
    description: str
    bodies: list[Body]
    headers: list[tuple[str, str]]


@dataclass(frozen=True)
class Operation:
    """One method on one path."""

    anchor: str
    method: str
    path: str
    summary: str
    description: str
    security: list[str]
    parameters: list[Schema]
    request: list[Body]
    answers: list[Answer]


@dataclass(frozen=True)
class Section:
    """The operations of one tag."""

    name: str
    description: str
    operations: list[Operation] = field(default_factory=list)


def with_code(text: str) -> Markup:
    """Escaped text whose `backquoted` spans become <code> elements."""
    pieces = CODE_SPAN.split(text)  # odd indexes are the spans' contents
    code = Markup("<code>{}</code>")
    return Markup("").join(
        code.format(piece) if index % 2 else escape(piece) for index, piece in enumerate(pieces)
    )


def pretty(schema: Schema) -> str:
    """A schema as indented JSON."""
    return json.dumps(schema, indent=2)


def _bodies(content: Schema) -> list[Body]:
    bodies = []
    for media_type, entry in content.items():
        schema = entry.get("schema", {})
        target = schema.get("$ref", "")
        if target.startswith("#/components/schemas/"):
            bodies.append(Body(media_type, target.rsplit("/", 1)[1], None))
        else:
            bodies.append(Body(media_type, None, pretty(schema)))
    return bodies


def _resolve(document: Schema, value: Schema) -> Schema:
    target = value.get("$ref")
    if target is None:
        return value
    node: Any = document
    for part in target.removeprefix("#/").split("/"):
        node = node[part]
    return dict(node)


def _security(requirements: list[Schema]) -> list[str]:
    alternatives = []
    for requirement in requirements:
        if not requirement:
            alternatives.append("none (client_id in the form)")
        for scheme, scopes in requirement.items():
            alternatives.append(f"{scheme} ({' '.join(scopes)})" if scopes else scheme)
    return alternatives or ["none"]


def _operation(document: Schema, path: str, method: str, spec: Schema) -> Operation:
    answers = []
    for status, value in spec["responses"].items():
        response = _resolve(document, value)
        headers = [(name, h["description"]) for name, h in response.get("headers", {}).items()]
        answers.append(
            Answer(status, response["description"], _bodies(response.get("content", {})), headers)
        )
    request = spec.get("requestBody", {}).get("content", {})
    return Operation(
        anchor=spec["operationId"],
        method=method.upper(),
        path=path,
        summary=spec["summary"],
        description=spec["description"],
        security=_security(spec["security"]),
        parameters=spec.get("parameters", []),
        request=_bodies(request),
        answers=answers,
    )


def sections(document: Schema) -> list[Section]:
    """Every operation of the document, under its first tag, in the document's tag order."""
    by_tag = {tag["name"]: Section(tag["name"], tag["description"]) for tag in document["tags"]}
    for path, methods in document["paths"].items():
        for method, spec in methods.items():
            by_tag[spec["tags"][0]].operations.append(_operation(document, path, method, spec))
    return [section for section in by_tag.values() if section.operations]


def schemas(document: Schema) -> list[tuple[str, str]]:
    """Every named schema, as indented JSON."""
    return [(name, pretty(schema)) for name, schema in document["components"]["schemas"].items()]


def security_schemes(document: Schema) -> list[tuple[str, str]]:
    """Every security scheme, as indented JSON."""
    found = document["components"]["securitySchemes"].items()
    return [(name, pretty(scheme)) for name, scheme in found]

"""Checks of a device type's telemetry schema before it is stored as a schema version.

A schema version is a JSON Schema object with one property per metric. The checks run in three
steps, each with messages that name the property and the keyword at fault:

1. the document is valid JSON Schema (``jsonschema``'s ``check_schema`` for the draft it
   declares, 2020-12 when it declares none);
2. it uses only what the collector's validator understands: at the top level ``type: "object"``,
   ``properties``, ``additionalProperties`` (true or false) and descriptive keys; per property
   ``type`` (``number``, ``integer``, ``boolean``, ``string`` or a list of them), ``minimum``,
   ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``, ``enum``, ``allowNonFinite`` and the
   annotations ``unit``, ``title``, ``description``, ``$comment``, ``examples``, ``default``,
   ``format``; metric names are what an agent may send (``[A-Za-z0-9_.:-/]``, at most 128);
3. the collector's own validator compiles it (:func:`collector.validation.compile_schema`), so
   that what is stored here is exactly what the collector can enforce.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from collector.errors import CollectorError
from collector.validation import SchemaError, compile_schema

TOP_LEVEL_KEYS = frozenset(
    {"$schema", "$id", "$comment", "title", "description", "type", "properties"}
    | {"additionalProperties"}
)
PROPERTY_TYPES = ("number", "integer", "boolean", "string")
RANGE_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
PROPERTY_KEYWORDS = frozenset({"type", *RANGE_KEYWORDS, "enum", "allowNonFinite"})
ANNOTATIONS = frozenset(
    {"unit", "title", "description", "$comment", "examples", "default", "format"}
)
METRIC_NAME = re.compile(r"^[A-Za-z0-9_.:\-/]{1,128}$")


class SchemaFileError(CollectorError):
    """A schema document that cannot be stored; ``problems`` lists every reason found."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def load_schema_file(path: Path) -> dict[str, Any]:
    """Read, parse and check the JSON Schema file at ``path``; return the document."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SchemaFileError(source, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaFileError(source, [f"cannot read: {exc}"]) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaFileError(
            source, [f"not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"]
        ) from None
    return check_schema_document(document, source)


def check_schema_document(document: Any, source: str = "<schema>") -> dict[str, Any]:
    """Check a parsed schema document; raise :class:`SchemaFileError` listing every problem."""
    if not isinstance(document, dict):
        raise SchemaFileError(
            source, [f"a schema must be a JSON object, got {_json_type(document)}"]
        )
    problems = _json_schema_problems(document)
    if problems:
        raise SchemaFileError(source, problems)
    problems = _supported_problems(document)
    if problems:
        raise SchemaFileError(source, problems)
    # The collector's validator is the one that enforces the schema: it must accept it too.
    try:
        compile_schema(document)
    except SchemaError as exc:
        raise SchemaFileError(source, [f"the collector's validator refuses it: {exc}"]) from None
    return document


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _json_schema_problems(document: dict[str, Any]) -> list[str]:
    cls = jsonschema.validators.validator_for(document, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(document)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        location = f" at {where}" if where else ""
        return [f"not a valid JSON Schema{location}: {exc.message}"]
    return []


def _supported_problems(document: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for key in sorted(set(document) - TOP_LEVEL_KEYS):
        problems.append(
            f"unsupported top-level keyword {key!r} (supported: {', '.join(sorted(TOP_LEVEL_KEYS))})"
        )
    if document.get("type") != "object":
        problems.append(
            f'type: a telemetry schema is an object schema: write "type": "object" '
            f"(got {json.dumps(document.get('type'))})"
        )
    if "additionalProperties" in document and not isinstance(
        document["additionalProperties"], bool
    ):
        problems.append("additionalProperties: must be true or false")
    properties = document.get("properties")
    if not isinstance(properties, dict) or not properties:
        problems.append("properties: list the metrics, one property per metric")
        return problems
    for name, prop in properties.items():
        problems.extend(_property_problems(str(name), prop))
    return problems


def _property_problems(name: str, prop: Any) -> list[str]:
    where = f"properties.{name}"
    if not METRIC_NAME.match(name):
        return [f"{where}: metric names use letters, digits and _ . : - / (1 to 128 characters)"]
    if not isinstance(prop, dict):
        return [f"{where}: must be an object describing one metric"]
    problems = [
        f"{where}: unsupported keyword {key!r} (supported: "
        f"{', '.join(sorted(PROPERTY_KEYWORDS | ANNOTATIONS))})"
        for key in sorted(set(prop) - PROPERTY_KEYWORDS - ANNOTATIONS)
    ]
    raw_type = prop.get("type")
    if raw_type is None:
        problems.append(f"{where}.type: missing; one property per metric of type {_types()}")
        return problems
    names = [raw_type] if isinstance(raw_type, str) else list(raw_type)
    for type_name in names:
        if type_name not in PROPERTY_TYPES:
            problems.append(
                f"{where}.type: {type_name!r} is not supported; a metric is one of {_types()}"
            )
    numeric = bool({"number", "integer"} & set(names))
    for key in RANGE_KEYWORDS:
        if key in prop:
            value = prop[key]
            if not numeric:
                problems.append(f"{where}.{key}: only numeric metrics can have a range")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                problems.append(f"{where}.{key}: must be a number")
            elif not math.isfinite(value):
                problems.append(f"{where}.{key}: must be finite")
    low = _bound(prop, "minimum", "exclusiveMinimum")
    high = _bound(prop, "maximum", "exclusiveMaximum")
    if low is not None and high is not None and low > high:
        problems.append(f"{where}: the minimum {low:g} is above the maximum {high:g}")
    if "enum" in prop and isinstance(prop["enum"], list) and not prop["enum"]:
        problems.append(f"{where}.enum: must list at least one value")
    if "allowNonFinite" in prop:
        if not isinstance(prop["allowNonFinite"], bool):
            problems.append(f"{where}.allowNonFinite: must be true or false")
        elif "number" not in names:
            problems.append(f"{where}.allowNonFinite: only a number metric can be non-finite")
    if "unit" in prop and not isinstance(prop["unit"], str):
        problems.append(f'{where}.unit: must be a string such as "°C"')
    return problems


def _bound(prop: dict[str, Any], inclusive: str, exclusive: str) -> float | None:
    for key in (inclusive, exclusive):
        value = prop.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _types() -> str:
    return ", ".join(PROPERTY_TYPES)


def metrics_of(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The metrics of a checked schema document: name to property."""
    properties = document.get("properties", {})
    return {str(k): v for k, v in properties.items() if isinstance(v, dict)}

"""Checks of JSON Schema files before they become schema versions (no database needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from collector.admin.schemafile import SchemaFileError, check_schema_document, load_schema_file
from collector.cli import main
from collector.validation import compile_schema
from tests.admin.conftest import REPO

EXAMPLES = sorted((REPO / "config" / "schemas").glob("*.json"))


def _problems(document: Any) -> list[str]:
    with pytest.raises(SchemaFileError) as caught:
        check_schema_document(document, "t.json")
    return caught.value.problems


def _metric(**prop: Any) -> dict[str, Any]:
    return {"type": "object", "properties": {"m": prop}}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_schema_files_pass(path: Path) -> None:
    """Every schema file in config/schemas/ passes the checks and compiles in the collector."""
    document = load_schema_file(path)
    compiled = compile_schema(document)
    assert set(document["properties"]) == set(compiled.rules)
    assert compiled.additional is False


def test_example_files_exist() -> None:
    """The three demo schemas and the gateway-health schema of the system input are there."""
    assert ["environmental.json", "gateway-health.json", "power-meter.json", "vibration.json"] == [
        p.name for p in EXAMPLES
    ]


def test_not_json(tmp_path: Path) -> None:
    """A file that is not JSON is named with the line and column."""
    path = tmp_path / "broken.json"
    path.write_text('{"type": "object",\n  "properties": {,}}')
    with pytest.raises(SchemaFileError) as caught:
        load_schema_file(path)
    assert [
        "not valid JSON: line 2 column 18: Expecting property name enclosed in double quotes"
    ] == caught.value.problems
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    """A missing file says so."""
    with pytest.raises(SchemaFileError, match="file not found"):
        load_schema_file(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ([1, 2], "a schema must be a JSON object, got an array"),
        ("text", "a schema must be a JSON object, got a string"),
    ],
)
def test_non_object_document(document: Any, expected: str) -> None:
    """A document that is not a JSON object is refused as such."""
    assert [expected] == _problems(document)


def test_invalid_json_schema_names_the_place() -> None:
    """A document that is not valid JSON Schema names the path and the problem."""
    problems = _problems(_metric(type="number", minimum="low"))
    assert [
        "not a valid JSON Schema at properties/m/minimum: 'low' is not of type 'number'"
    ] == problems
    assert [
        "not a valid JSON Schema at properties/m/type: 'decimal' is not valid under any of the given schemas"
    ] == _problems(_metric(type="decimal"))


def test_top_level_must_be_an_object_schema() -> None:
    """The top level is an object schema with properties, nothing else."""
    assert [
        'type: a telemetry schema is an object schema: write "type": "object" (got "array")'
    ] == _problems({"type": "array", "properties": {"m": {"type": "number"}}})
    assert ["properties: list the metrics, one property per metric"] == _problems(
        {"type": "object"}
    )
    problems = _problems(
        {"type": "object", "required": ["m"], "properties": {"m": {"type": "number"}}}
    )
    assert 1 == len(problems) and problems[0].startswith("unsupported top-level keyword 'required'")


@pytest.mark.parametrize(
    ("prop", "expected"),
    [
        ({"type": "number", "pattern": "^x"}, "properties.m: unsupported keyword 'pattern'"),
        ({"type": "number", "multipleOf": 2}, "properties.m: unsupported keyword 'multipleOf'"),
        (
            {"type": "object"},
            "properties.m.type: 'object' is not supported; a metric is one of number, integer, boolean, string",
        ),
        ({"type": "array"}, "properties.m.type: 'array' is not supported"),
        (
            {"unit": "V"},
            "properties.m.type: missing; one property per metric of type number, integer, boolean, string",
        ),
        (
            {"type": "string", "minimum": 1},
            "properties.m.minimum: only numeric metrics can have a range",
        ),
        (
            {"type": "number", "minimum": 5, "maximum": 1},
            "properties.m: the minimum 5 is above the maximum 1",
        ),
        ({"type": "number", "unit": 3}, 'properties.m.unit: must be a string such as "°C"'),
        (
            {"type": "integer", "allowNonFinite": True},
            "properties.m.allowNonFinite: only a number metric can be non-finite",
        ),
    ],
)
def test_property_problems_name_property_and_keyword(prop: dict[str, Any], expected: str) -> None:
    """Each unsupported or contradictory property is named with its keyword."""
    problems = _problems(_metric(**prop))
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_listed() -> None:
    """Several bad properties give one line each, not just the first."""
    document = {
        "type": "object",
        "properties": {
            "a": {"type": "number", "pattern": "x"},
            "b": {"type": "object"},
            "c": {"type": "number"},
        },
    }
    problems = _problems(document)
    assert 2 == len(problems)
    assert problems[0].startswith("properties.a:") and problems[1].startswith("properties.b.type:")


def test_metric_names_follow_the_agent() -> None:
    """A metric name the agent could not send is refused."""
    assert [
        "properties.bad name: metric names use letters, digits and _ . : - / (1 to 128 characters)"
    ] == _problems({"type": "object", "properties": {"bad name": {"type": "number"}}})


def test_supported_keywords_are_accepted() -> None:
    """Everything the collector's validator understands is accepted, and compiles there."""
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "all",
        "type": "object",
        "additionalProperties": True,
        "properties": {
            "n": {
                "type": "number",
                "exclusiveMinimum": 0,
                "exclusiveMaximum": 1,
                "allowNonFinite": True,
            },
            "i": {"type": "integer", "minimum": 0, "maximum": 10, "unit": "count", "default": 3},
            "b": {"type": "boolean", "description": "flag"},
            "s": {"type": "string", "enum": ["on", "off"], "examples": ["on"]},
            "mixed": {"type": ["number", "string"], "$comment": "either"},
        },
    }
    assert document == check_schema_document(document)
    assert {"n", "i", "b", "s", "mixed"} == set(compile_schema(document).rules)


def test_schemas_check_command(tmp_path: Path) -> None:
    """`schemas check` prints the metrics of a good file and fails naming a bad one."""
    runner = CliRunner()
    good = runner.invoke(main, ["schemas", "check", str(EXAMPLES[0])])
    assert 0 == good.exit_code
    assert "ok, 3 metrics" in good.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_metric(type="number", pattern="x")))
    result = runner.invoke(main, ["schemas", "check", str(bad)])
    assert 1 == result.exit_code
    assert f"{bad}: properties.m: unsupported keyword 'pattern'" in result.output

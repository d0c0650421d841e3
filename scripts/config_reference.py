"""Generate docs/configuration.md from the settings models and the commented example files.

Every key comes from the pydantic models (so the reference cannot miss one), its type and
default from the model, its explanation from the comment above it in the example file
(config/agent.example.toml, config/collector.example.toml, agent/inputs/<kind>/sample.toml).
``python scripts/config_reference.py`` rewrites the page; ``--check`` exits 1 when the page is
stale or a key has no comment in its example file (the test suite runs the check); stale also means
a model key that its example file does not show.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.inputs.base import InputConfig, kinds  # noqa: E402
from agent.settings import Settings as AgentSettings  # noqa: E402
from collector.settings import Settings as CollectorSettings  # noqa: E402

OUTPUT = ROOT / "docs" / "configuration.md"
_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\-]+)\s*\]\]?\s*$")
_KEY = re.compile(r"^\s*(#\s*)?([A-Za-z0-9_\-]+)\s*=")


@dataclass(frozen=True)
class Key:
    """One documented key."""

    section: str
    name: str
    type: str
    default: str
    text: str | None


def comments(path: Path) -> dict[tuple[str, str], str]:
    """Map (section, key) to the comment above the key in a TOML example.

    Keys written one after another without a blank line share the comment above the first.
    Commented-out keys (``# key = value``, optional keys shown with an example) count as shown.
    """
    found: dict[tuple[str, str], str] = {}
    section = ""
    pending: list[str] = []
    group: str | None = None
    for line in path.read_text().splitlines():
        header = _HEADER.match(line)
        key = _KEY.match(line)
        if header:
            section = header.group(1)
            parent, _, leaf = section.rpartition(".")
            found.setdefault((parent, leaf), " ".join(pending).strip())
            pending, group = [], None
        elif key:
            name = key.group(2)
            text = " ".join([*pending, _trailing_comment(line)]).strip()
            if not text and group:
                text = f"See `{group}`."
            elif text:
                group = name
            if text or (section, name) not in found:
                found[(section, name)] = text
            pending = []
        elif line.strip().startswith("#"):
            pending.append(line.strip().lstrip("#").strip())
        elif not line.strip():
            pending, group = [], None
    return found


def _trailing_comment(line: str) -> str:
    """The ``# ...`` after a key's value, outside any quoted string."""
    body = line.split("=", 1)[1] if "=" in line else ""
    quoted = False
    for i, char in enumerate(body):
        if char == '"':
            quoted = not quoted
        elif char == "#" and not quoted:
            return body[i + 1 :].strip()
    return ""


def _validator_names(info: FieldInfo) -> set[str]:
    names = set()
    for meta in info.metadata:
        func = getattr(meta, "func", None)
        if func is not None:
            names.add(getattr(func, "__name__", ""))
    return names


def _type_name(annotation: Any, info: FieldInfo) -> str:
    validators = _validator_names(info)
    if "parse_duration" in validators:
        return "duration"
    if "parse_size" in validators:
        return "size"
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(
            f'`"{a}"`' if isinstance(a, str) else f"`{a}`" for a in get_args(annotation)
        )
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a, FieldInfo()) for a in get_args(annotation) if a is not type(None)]
        return " \\| ".join(parts)
    if origin in (list, tuple):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        inner = _type_name(args[0], FieldInfo()) if args else "value"
        if get_origin(args[0]) is typing.Annotated if args else False:
            inner = _type_name(
                get_args(args[0])[0], FieldInfo(metadata=list(get_args(args[0])[1:]))
            )
        return f"list of {inner}"
    if origin is dict:
        key_t, value_t = get_args(annotation) or (str, str)
        return f"table of {_type_name(key_t, FieldInfo())} to {_type_name(value_t, FieldInfo())}"
    if origin is typing.Annotated:
        base, *meta = get_args(annotation)
        return _type_name(base, FieldInfo(metadata=meta))
    if isinstance(annotation, type):
        return {
            "str": "string",
            "int": "integer",
            "float": "number",
            "bool": "boolean",
            "UUID": "UUID",
            "Path": "path",
            "PosixPath": "path",
            "dict": "table",
        }.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def _default(info: FieldInfo) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    validators = _validator_names(info)
    if "parse_duration" in validators and isinstance(value, int | float):
        return f"`{_duration(float(value))}`"
    if "parse_size" in validators and isinstance(value, int):
        return f"`{_size(value)}`"
    if isinstance(value, tuple | list) and value and all(isinstance(v, float) for v in value):
        return "`[" + ", ".join(f'"{_duration(v)}"' for v in value) + "]`"
    if isinstance(value, BaseModel):
        return "(table)"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list | tuple | dict) and not value:
        return "empty"
    return f"`{value}`"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms" if seconds < 1 else f"{seconds}s"


def _size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n % size == 0 and n >= size:
            return f"{n // size}{unit}"
    return f"{n}B"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _list_items(annotation: Any) -> list[type[BaseModel]]:
    """The table models of a list or tuple of tables (a union of models gives several)."""
    if get_origin(annotation) not in (list, tuple):
        return []
    args = [a for a in get_args(annotation) if a is not Ellipsis]
    if len(args) != 1:
        return []
    item = args[0]
    if get_origin(item) is typing.Annotated:
        item = get_args(item)[0]
    candidates = get_args(item) if get_origin(item) in (typing.Union, types.UnionType) else (item,)
    models = [m for c in candidates if (m := _model_of(c)) is not None]
    return models if len(models) == len(candidates) else []


def walk(model: type[BaseModel], section: str, notes: dict[tuple[str, str], str]) -> Iterator[Key]:
    """Every key of ``model`` (sections first-level, then nested), with its comment."""
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        sub = _model_of(annotation)
        if sub is not None:
            nested.append((f"{section}.{name}" if section else name, sub))
            continue
        items = _list_items(annotation)
        if items:
            if items == [InputConfig]:
                continue  # input kinds are documented per kind
            yield Key(section, name, "list of tables", _default(info), notes.get((section, name)))
            for item in items:
                nested.append((f"{section}.{name}" if section else name, item))
            continue
        yield Key(
            section, name, _type_name(annotation, info), _default(info), notes.get((section, name))
        )
    for path, sub in nested:
        yield from walk(sub, path, notes)


# Keys every input kind shares, explained once here rather than in every sample file.
COMMON = {
    ("inputs", "type"): "The input kind; it decides which other keys the table takes.",
    (
        "inputs",
        "name",
    ): "A name for this input instance, unique in the file (logs, `sensormine-agent inputs test <name>`).",
    ("inputs", "devices"): "The devices this input reads, one `[[inputs.devices]]` table each.",
    (
        "inputs.devices",
        "id",
    ): "The device's id as registered with the collector (`sensormine-collector devices list`).",
    ("inputs.devices", "name"): "A name for the device in logs and in `inputs test` output.",
}


def render() -> tuple[str, list[str]]:
    """The page, and the keys that do not appear in their example file."""
    out = [
        "# Configuration reference",
        "",
        "Generated by `scripts/config_reference.py` from the settings models and the comments of the",
        "example files; `make test` fails when this page and the code disagree. Durations are written",
        '`"500ms"`, `"5s"`, `"2m"`, `"1h"`, `"1d"`, `"2w"`; sizes `"64KiB"`, `"512MiB"`, `"1.5GiB"`,',
        '`"1GB"`: the same units in every key of both programs (`service/config.py`). Unknown keys',
        "are refused, and a refusal names the file, the key and the problem.",
        "",
    ]
    missing: list[str] = []

    def table(title: str, keys: list[Key], source: str) -> None:
        sections: dict[str, list[Key]] = {}
        seen: set[tuple[str, str]] = set()
        for key in keys:
            if (key.section, key.name) not in seen:  # alternatives of one table share keys
                seen.add((key.section, key.name))
                sections.setdefault(key.section, []).append(key)
        out.extend([f"## {title}", "", f"Example with every key: `{source}`.", ""])
        for section, items in sections.items():
            out.extend(
                [
                    f"### `[{section}]`" if section else "### top level",
                    "",
                    "| key | type | default | meaning |",
                    "|---|---|---|---|",
                ]
            )
            for key in items:
                if key.text is None:
                    missing.append(f"{source}: [{key.section}] {key.name}")
                text = (key.text or "").replace("|", "\\|")
                out.append(f"| `{key.name}` | {key.type} | {key.default} | {text} |")
            out.append("")

    agent_example = ROOT / "config" / "agent.example.toml"
    table(
        "Agent (`/etc/sensormine/agent.toml`)",
        list(walk(AgentSettings, "", comments(agent_example))),
        "config/agent.example.toml",
    )
    out.extend(
        [
            "Secrets: the MQTT password is read from `mqtt.password_file`, else the environment variable",
            "`SENSORMINE_MQTT_PASSWORD`, else `$CREDENTIALS_DIRECTORY/mqtt-password` (systemd",
            "`LoadCredential=`); `SENSORMINE_MQTT_USERNAME` overrides `mqtt.username`.",
            "",
        ]
    )
    for name, input_kind in sorted(kinds().items()):
        sample = ROOT / "agent" / "inputs" / name / "sample.toml"
        notes = comments(sample)
        for where, text in COMMON.items():
            if where in notes and not notes[where]:
                notes[where] = text
        keys = list(walk(input_kind.config_model, "inputs", notes))
        table(f'Agent input `type = "{name}"`', keys, f"agent/inputs/{name}/sample.toml")
    collector_example = ROOT / "config" / "collector.example.toml"
    table(
        "Collector (`/etc/sensormine/collector.toml`)",
        list(walk(CollectorSettings, "", comments(collector_example))),
        "config/collector.example.toml",
    )
    out.extend(
        [
            "Environment: any collector key can be set as `SENSORMINE_COLLECTOR__<SECTION>__<KEY>`",
            "(e.g. `SENSORMINE_COLLECTOR__MQTT__HOST`). Secrets: the MQTT password from `mqtt.password_file`,",
            "`SENSORMINE_MQTT_PASSWORD` or `$CREDENTIALS_DIRECTORY/mqtt-password`; database passwords from the",
            "URL, `password_file`, `SENSORMINE_METADATA_PASSWORD` / `SENSORMINE_TIMESERIES_PASSWORD`, or",
            "`$CREDENTIALS_DIRECTORY/metadata-password` / `timeseries-password`.",
            "",
        ]
    )
    return "\n".join(out).rstrip() + "\n", missing


def main() -> int:
    """Write the page, or with ``--check`` compare it."""
    page, missing = render()
    if "--check" in sys.argv:
        problems = [f"key not shown in its example file: {m}" for m in missing]
        if not OUTPUT.exists() or OUTPUT.read_text() != page:
            problems.append(
                f"{OUTPUT.relative_to(ROOT)} is stale: run python scripts/config_reference.py"
            )
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    OUTPUT.write_text(page)
    for m in missing:
        print(f"warning: key not shown in its example file: {m}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

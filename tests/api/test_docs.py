"""docs/api.md: every endpoint is documented, and every example request gives an answer of the
documented shape (the same keys, recursively) when run against a collector's data."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

from tests.api.conftest import World
from tests.ops.units import REPO

DOC = REPO / "docs" / "api.md"
EXAMPLE = re.compile(
    r'```sh\ncurl -s -H "Authorization: Bearer \$TOKEN" "\$API([^"]+)"\n```\n\n```json\n(.*?)\n```',
    re.S,
)


def examples() -> list[tuple[str, Any]]:
    return [(url, json.loads(answer)) for url, answer in EXAMPLE.findall(DOC.read_text())]


def shape(value: Any) -> Any:
    """The keys of ``value``, recursively; a list's shape is its first element's."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return None


def same_shape(doc: Any, real: Any, where: str) -> None:
    if isinstance(doc, dict) and isinstance(real, dict):
        if set(doc) != set(real) and not where.endswith(
            ("latest", "by_reason", "devices", "attributes")
        ):
            raise AssertionError(f"{where}: documented keys {sorted(doc)}, answered {sorted(real)}")
        for k in set(doc) & set(real):
            same_shape(doc[k], real[k], f"{where}.{k}")
    elif isinstance(doc, list) and isinstance(real, list) and doc and real:
        same_shape(doc[0], real[0], f"{where}[0]")


def test_every_endpoint_of_the_openapi_document_is_in_the_docs(world: World) -> None:
    with world.client(None) as c:
        paths = c.get("/api/v1/openapi.json").json()["paths"]
    text = DOC.read_text()
    missing = [p for p in paths if p.startswith("/api/") and f"### `GET {p}`" not in text]
    assert [] == missing


def test_every_documented_example_answers_in_its_documented_shape(world: World) -> None:
    found = examples()
    assert len(found) >= 13
    f = world.fleet
    start = world.start + timedelta(minutes=30)
    with world.a() as c:
        for url, documented in found:
            real_url = (
                url.replace("$GATEWAY", str(f.gateway))
                .replace("$DEVICE", str(f.devices[1]))
                .replace("2026-12-07T05:30:00Z", start.isoformat().replace("+00:00", "Z"))
                .replace(
                    "2026-12-07T05:35:00Z",
                    (start + timedelta(minutes=5)).isoformat().replace("+00:00", "Z"),
                )
            )
            r = c.get(real_url)
            problem = "code" in documented and "type" in documented
            assert (documented["status"] if problem else 200) == r.status_code, (url, r.text)
            if problem:
                assert documented["code"] == r.json()["code"]
            same_shape(documented, r.json(), url)
            if "resolution" in documented:
                assert documented["resolution"] == r.json()["resolution"]
                assert len(documented["points"]["time"]) == len(r.json()["points"]["time"])

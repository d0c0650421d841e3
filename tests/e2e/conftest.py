"""The whole system as real processes: the demo's orchestration on per-test databases."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import drop_database
from tests.services import SYSTEM_PG_DSN

ROOT = Path(__file__).resolve().parents[2]


def _demo_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sensormine_demo", ROOT / "scripts" / "demo.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


demo = _demo_module()


@pytest.fixture
def make_system(tmp_path: Path) -> Iterator[object]:
    """Build a LocalSystem with its own databases, topic prefix and state directory."""
    made: list[object] = []

    def build(mqtt_port: int = 1883) -> object:
        tag = uuid.uuid4().hex[:10]
        system = demo.LocalSystem(
            tmp_path / f"system-{tag}",
            mqtt_port=mqtt_port,
            name=f"sme2e_{tag}",
            prefix=f"sme2e-{tag}",
            interval="200ms",
        )
        made.append(system)
        system.prepare()
        return system

    yield build
    for system in made:
        system.kill_everything()  # type: ignore[attr-defined]
        for dsn in (system.metadata_dsn, system.timeseries_dsn):  # type: ignore[attr-defined]
            asyncio.run(drop_database(SYSTEM_PG_DSN, dsn))

"""Fixtures of the administration tests: a migrated scratch metadata database and the real CLI."""

from __future__ import annotations

import asyncio
import json
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner, Result

from collector import migrations
from collector.cli import main
from tests.conftest import create_database, drop_database
from tests.services import SYSTEM_PG_DSN

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Admin:
    """The real ``sensormine-collector`` CLI bound to one scratch metadata database."""

    dsn: str
    config: Path
    workdir: Path

    def run(self, *args: str, ok: bool = True) -> Result:
        """Run one command (``args`` or a single shell-like string); check its exit status."""
        argv = list(shlex.split(args[0]) if len(args) == 1 else args)
        result = CliRunner().invoke(
            main,
            argv,
            env={"SENSORMINE_COLLECTOR_CONFIG": str(self.config)},
            catch_exceptions=False,
        )
        if ok and result.exit_code != 0:
            raise AssertionError(f"{argv} exited {result.exit_code}:\n{result.output}")
        if not ok and result.exit_code == 0:
            raise AssertionError(f"{argv} was expected to fail:\n{result.output}")
        return result

    def data(self, command: str) -> Any:
        """Run ``command`` with ``--json`` and parse its output."""
        return json.loads(self.run(f"{command} --json").stdout)

    def fail(self, *args: str) -> str:
        """Run a command that must fail; return its output (the error message)."""
        return self.run(*args, ok=False).output

    def query(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        """Rows of a query on the metadata database."""

        async def go() -> list[dict[str, Any]]:
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.set_type_codec(
                    "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
                )
                return [dict(r.items()) for r in await conn.fetch(sql, *params)]
            finally:
                await conn.close()

        return asyncio.run(go())

    def scalar(self, sql: str, *params: Any) -> Any:
        """The single value of a query."""
        rows = self.query(sql, *params)
        return next(iter(rows[0].values()))


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    """A migrated scratch metadata database and a collector.toml naming it."""
    dsn = asyncio.run(create_database(SYSTEM_PG_DSN, "smadmin", timescale=False))
    try:
        asyncio.run(migrations.apply(dsn, "metadata"))
        config = tmp_path / "collector.toml"
        config.write_text(
            f'[metadata]\ndsn = "{dsn}"\n\n[timeseries]\ndsn = "{dsn}"\n', encoding="utf-8"
        )
        yield Admin(dsn, config, tmp_path)
    finally:
        asyncio.run(drop_database(SYSTEM_PG_DSN, dsn))

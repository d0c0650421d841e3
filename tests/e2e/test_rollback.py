"""A gateway's buffer restored from a backup, against the real collector: its reissued seqs
conflict, the agent renews its stream, and every reading of every run is stored exactly once."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from collector.service import running
from tests.agent.conftest import agent_cli, device_ids, start_agent, write_config
from tests.collector.conftest import Databases, collector_settings, dbs  # noqa: F401
from tests.services import SYSTEM_MQTT, free_port


def _status(config: Path) -> dict[str, Any]:
    result = agent_cli("status", "--json", "--config", str(config))
    assert 0 == result.returncode, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


async def _run_agent(config: Path, log: Path, seconds: float) -> None:
    """Run the agent for ``seconds``, then SIGTERM it (it drains) and wait for it."""
    agent = start_agent(config, log)
    try:
        await asyncio.sleep(seconds)
        agent.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(agent.wait, 30)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert 0 == code, _tail(log)


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


def _files(buffer: Path) -> list[Path]:
    return [buffer, Path(f"{buffer}-wal"), Path(f"{buffer}-shm")]


async def test_a_restored_buffer_backup_loses_and_doubles_nothing(
    dbs: Databases,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Run, back the buffer up, run on (committed), restore the backup, run again: the third
    run's batches reuse committed seqs with new content; the collector answers conflict, the
    agent renews its stream, and telemetry holds every reading of the three runs once."""
    fleet = dbs.fleet
    assert fleet is not None
    p = f"rb{uuid.uuid4().hex[:10]}"
    free_type = uuid.uuid4()
    await dbs.meta(
        "INSERT INTO device_types (id, tenant_id, name) VALUES ($1, $2, 'sim')",
        free_type,
        fleet.tenant,
    )
    for i, device in enumerate(device_ids(2)):
        await dbs.meta(
            "INSERT INTO devices (id, tenant_id, device_type_id, gateway_id, name)"
            " VALUES ($1, $2, $3, $4, $5)",
            device,
            fleet.tenant,
            free_type,
            fleet.gateway,
            f"sim-{i}",
        )
    buffer = tmp_path / "buffer.db"
    config = write_config(
        tmp_path / "agent.toml",
        buffer=buffer,
        port=SYSTEM_MQTT[1],
        prefix=p,
        gateway=fleet.gateway,
        tenant=fleet.tenant,
        extra_batch='max_age = "200ms"',
        extra_mqtt='ack_timeout = "2s"',
    )
    metrics_port = free_port()
    settings = collector_settings(
        dbs, *SYSTEM_MQTT, p, metrics={"listen": f"127.0.0.1:{metrics_port}"}
    )
    backup = tmp_path / "backup"
    backup.mkdir()
    async with running(settings):
        await _run_agent(config, tmp_path / "run1.log", 3)
        first = _status(config)
        for f in _files(buffer):
            if f.exists():
                shutil.copy2(f, backup / f.name)
        await _run_agent(config, tmp_path / "run2.log", 3)
        second = _status(config)
        for f in _files(buffer):
            f.unlink(missing_ok=True)
            if (backup / f.name).exists():
                shutil.copy2(backup / f.name, f)
        await _run_agent(config, tmp_path / "run3.log", 4)
        third = _status(config)
        body = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
            )
        )
    assert 0 == second["readings"] == third["readings"], (second, third)
    produced = int(second["produced"]) + int(third["produced"]) - int(first["produced"])
    rows = await dbs.fetch(
        "SELECT count(*) AS n, count(DISTINCT (device_id, metric, time)) AS d FROM readings"
    )
    assert (produced, produced) == (rows[0]["n"], rows[0]["d"])
    assert "sensormine_collector_conflicts_total 0.0" not in body
    run3 = await asyncio.to_thread((tmp_path / "run3.log").read_text)
    assert "stream.renewed" in run3
    streams = await dbs.fetch("SELECT DISTINCT stream FROM ingest_ledger")
    assert 2 == len(streams)

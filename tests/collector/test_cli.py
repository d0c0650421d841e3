"""The sensormine-collector CLI as a real child process, the metrics endpoint, gateway status frames."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

from collector.service import running
from protocol import GatewayStatus, TopicKind, encode_frame
from tests.collector.conftest import (
    Databases,
    GatewayClient,
    collector_settings,
    make_batch,
    now_us,
)
from tests.conftest import create_database, drop_database
from tests.services import SYSTEM_MQTT, SYSTEM_PG_DSN, free_port


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _config(path: Path, metadata: str, timeseries: str) -> Path:
    path.write_text(f'[metadata]\ndsn = "{metadata}"\n[timeseries]\ndsn = "{timeseries}"\n')
    return path


async def test_migrate_status_and_check_config(tmp_path: Path) -> None:
    """migrate --status lists pending files, migrate applies them, check-config validates."""
    meta = await create_database(SYSTEM_PG_DSN, "smcli", timescale=False)
    ts = await create_database(SYSTEM_PG_DSN, "smcli", timescale=True)
    try:
        config = _config(tmp_path / "c.toml", meta, ts)
        before = _cli("migrate", "--status", "--config", str(config))
        assert 0 == before.returncode, before.stderr
        assert "metadata   0001_registry" in before.stdout and "pending" in before.stdout
        applied = _cli("migrate", "--config", str(config))
        assert 0 == applied.returncode, applied.stderr
        assert "metadata: 0001" in applied.stdout
        after = _cli("migrate", "--status", "--config", str(config))
        assert "pending" not in after.stdout
        assert 0 == _cli("check-config", "--config", str(config)).returncode
        bad = tmp_path / "bad.toml"
        bad.write_text('[metadata]\ndsn = "Host=x;Colour=red"\n')
        result = _cli("check-config", "--config", str(bad))
        assert 1 == result.returncode
        assert (
            "bad.toml: metadata.dsn" in result.stderr
            and "timeseries: Field required" in result.stderr
        )
    finally:
        await drop_database(SYSTEM_PG_DSN, meta)
        await drop_database(SYSTEM_PG_DSN, ts)


async def test_status_metrics_and_gateway_will(dbs: Databases, tmp_path: Path) -> None:
    """After batches and a gateway's offline will: status --json, /metrics and the status history agree."""
    fleet = dbs.fleet
    assert fleet is not None
    p = f"c{uuid.uuid4().hex[:10]}"
    port = free_port()
    settings = collector_settings(dbs, *SYSTEM_MQTT, p, metrics={"listen": f"127.0.0.1:{port}"})
    stream = uuid.uuid4()
    async with running(settings):
        with GatewayClient(*SYSTEM_MQTT, p, fleet.tenant, fleet.gateway) as gw:
            first = make_batch(fleet, 1, stream, points=10)
            gw.publish(first)
            gw.publish(first)
            gw.publish(make_batch(fleet, 2, stream, values=[1000.0]))
            await asyncio.to_thread(gw.wait_acks, 3)
            will = GatewayStatus(gateway_id=fleet.gateway, state="offline", time=now_us())
            gw.publish(encode_frame(will), kind=TopicKind.STATUS)
            for _ in range(100):
                rows = await dbs.fetch(
                    "SELECT status, reason FROM device_status_history WHERE device_id IS NULL"
                )
                if rows:
                    break
                await asyncio.sleep(0.05)
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            )
    assert [("offline", "will")] == [(r["status"], r["reason"]) for r in rows]
    assert "sensormine_collector_points_accepted_total 10.0" in body
    assert 'sensormine_collector_points_quarantined_total{reason="out_of_range"} 1.0' in body
    assert "sensormine_collector_duplicates_total 1.0" in body
    assert "sensormine_collector_mqtt_connected 1.0" in body
    config = _config(tmp_path / "c.toml", dbs.metadata, dbs.timeseries)
    result = _cli("status", "--json", "--config", str(config))
    assert 0 == result.returncode, result.stderr
    report = json.loads(result.stdout)
    assert {
        "batches": 2,
        "accepted": 10,
        "quarantined": 1,
        "rejected": 0,
        "by_result": {"ok": 1, "quarantined": 1},
    } == report["ledger"]
    assert [
        {
            "reason": "out_of_range",
            "rows": 1,
            "points": 1,
            "bytes": report["quarantine"][0]["bytes"],
        }
    ] == report["quarantine"]
    assert [str(fleet.gateway)] == [g["gateway_id"] for g in report["gateways"]]
    assert [] == report["rejects"]

"""systemd/sensormine-broker-sync.{service,timer}: verified by systemd-analyze against a scratch
root, and running the command docs/security.md describes."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.ops.units import UNITS_DIR, make_scratch_root, parse_unit, verify

SERVICE = "sensormine-broker-sync.service"
TIMER = "sensormine-broker-sync.timer"


def test_broker_sync_units_verify_without_any_warning(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the service and its timer and has nothing to say."""
    root = make_scratch_root(tmp_path)
    for unit in (SERVICE, TIMER):
        shutil.copy(UNITS_DIR / unit, root / "etc/systemd/system" / unit)
    program = root / "opt/sensormine/venv/bin/sensormine-collector"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    for unit in (SERVICE, TIMER):
        result = verify(root, unit)
        assert (0, "", "") == (result.returncode, result.stdout, result.stderr), unit


def test_broker_sync_runs_daily_and_may_write_only_the_broker_files() -> None:
    """The timer is daily and catches up after downtime; the service runs `broker sync`, writes
    only /etc/mosquitto/sensormine, and gives the files to the broker's group."""
    timer = parse_unit(UNITS_DIR / TIMER)["Timer"]
    assert (["daily"], ["true"]) == (timer["OnCalendar"], timer["Persistent"])
    service = parse_unit(UNITS_DIR / SERVICE)["Service"]
    assert ["/opt/sensormine/venv/bin/sensormine-collector broker sync"] == service["ExecStart"]
    assert (["strict"], ["/etc/mosquitto/sensormine"]) == (
        service["ProtectSystem"],
        service["ReadWritePaths"],
    )
    assert "SENSORMINE_BROKER_GROUP=mosquitto" in service["Environment"]

"""Agents and a collector as real processes over the real broker and databases: exact counts."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import drop_database
from tests.services import SYSTEM_PG_DSN, MosquittoBroker
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _settle(system: Any) -> dict[str, int]:
    """Stop everything gracefully and return produced, buffered and the stored counts."""
    codes = system.stop_all()
    assert {name: 0 for name in codes} == codes
    counts: dict[str, int] = asyncio.run(system.stored_counts())
    counts["produced"] = system.produced()
    counts["buffered"] = system.buffered()
    return counts


def _assert_exact(counts: dict[str, int]) -> None:
    assert counts["produced"] > 0
    assert {"stored": counts["produced"], "duplicates": 0, "rejected": 0, "buffered": 0} == {
        "stored": counts["stored"],
        "duplicates": counts["duplicates"],
        "rejected": counts["rejected"],
        "buffered": counts["buffered"],
    }


def _stored(system: Any) -> int:
    return int(asyncio.run(system.stored_counts())["stored"])


def _stores_more(system: Any, readings: int = 1000) -> None:
    """Wait until ``readings`` more readings than now are stored: the pipeline flows."""
    target = _stored(system) + readings
    wait_for(lambda: _stored(system) >= target, 90.0, f"{target} readings stored", every=0.25)


def _produces_more(system: Any, readings: int = 1000) -> int:
    """Wait until the agents have taken ``readings`` more readings than now; that count."""
    target = system.produced() + readings
    wait_for(lambda: system.produced() >= target, 90.0, f"{target} readings produced", every=0.25)
    return int(system.produced())


def _catches_up(system: Any, produced: int) -> None:
    """Wait until everything produced up to ``produced`` is stored."""
    wait_for(
        lambda: _stored(system) >= produced,
        90.0,
        f"the {produced} readings produced stored",
        every=0.25,
    )


def test_normal_run_stores_every_reading_once(make_system: Callable[..., Any]) -> None:
    """Two agents and a collector run for a while; what the agents produced is stored once."""
    system = make_system()
    system.start_collector()
    system.start_agents()
    _stores_more(system, 2000)
    _assert_exact(_settle(system))


def test_agent_killed_and_restarted(make_system: Callable[..., Any]) -> None:
    """SIGKILL of the agents mid-run: after a restart, every committed reading is stored once."""
    system = make_system()
    system.start_collector()
    system.start_agents()
    for _ in range(3):
        _stores_more(system)
        for agent in system.agents.values():
            agent.stop(signal.SIGKILL)
        system.start_agents()
    _catches_up(system, _produces_more(system))
    _assert_exact(_settle(system))


def test_collector_killed_and_restarted(make_system: Callable[..., Any]) -> None:
    """SIGKILL of the collector mid-run: its persistent session and the agents' resends fill the gap once."""
    system = make_system()
    collector = system.start_collector()
    system.start_agents()
    _stores_more(system)
    collector.stop(signal.SIGKILL)
    produced = _produces_more(system)  # while no collector runs
    system.start_collector()
    _catches_up(system, produced)
    _assert_exact(_settle(system))


def test_broker_restarted(make_system: Callable[..., Any], private_broker: MosquittoBroker) -> None:
    """The broker stops for a few seconds while everything runs; every reading arrives once."""
    system = make_system(mqtt_port=private_broker.port)
    system.start_collector()
    system.start_agents()
    _stores_more(system)
    private_broker.stop()
    produced = _produces_more(system, 1500)  # buffered while the broker is away
    private_broker.start()
    _catches_up(system, produced)
    _assert_exact(_settle(system))


def test_demo_command(tmp_path: Path) -> None:
    """The demo script runs end to end and its last line reports exact counts; it serves the
    status page meanwhile (URL and token printed) and saves the two screenshots asked for."""
    name = f"sme2e_demo_{uuid.uuid4().hex[:8]}"
    shot = tmp_path / "shots" / "fleet.png"
    env = {
        **os.environ,
        "DEMO_SECONDS": "4",
        "DEMO_DATABASE": name,
        "DEMO_STATE": str(tmp_path / "state"),
        "DEMO_SCREENSHOT": str(shot),
    }
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "demo.py")],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
    finally:
        for db in (name, f"{name}_ts"):
            asyncio.run(drop_database(SYSTEM_PG_DSN, SYSTEM_PG_DSN.rpartition("/")[0] + "/" + db))
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"demo: produced=(\d+) stored=(\d+) quarantined=(\d+) rejected=(\d+) duplicates=(\d+)",
        last,
    )
    assert match, result.stdout + result.stderr
    produced, stored, quarantined, rejected, duplicates = (int(g) for g in match.groups())
    assert produced > 0
    assert (produced, 0, 0, 0) == (stored, quarantined, rejected, duplicates)
    assert 0 == result.returncode
    assert "rows per device type:" in result.stdout
    assert re.search(r"demo: status page http://127\.0\.0\.1:\d+/ui/#token=smt_", result.stdout)
    assert re.search(r"demo: API token of tenant demo: smt_[A-Za-z0-9_-]{43} ", result.stdout)
    for png in (shot, shot.with_name("fleet-device.png")):
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), png
        assert png.stat().st_size > 20_000, png  # a page with content, not a blank one
        assert f"demo: screenshot {png}" in result.stdout

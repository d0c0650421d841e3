"""The system input reading this machine."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import jsonschema
import pytest

from agent.inputs.base import InputContext
from agent.inputs.system import SystemConfig, SystemInput
from agent.inputs.system.collect import read_temperature
from tests.inputs.conftest import RecordingEmitter, build_config, load_sample, run_for, stop


def config(**extra: object) -> SystemConfig:
    """A system input with a short interval."""
    built = build_config(
        "system", {"type": "system", "name": "health", "interval": "100ms", **extra}
    )
    assert isinstance(built, SystemConfig)
    return built


def agent_context(tmp_path: Path) -> InputContext:
    """A context whose runtime figures are known."""
    return InputContext(
        gateway_id=uuid.uuid4(),
        buffer_path=tmp_path / "spool" / "buffer.db",
        stats=lambda: {"buffer_readings": 12.0, "dropped": 3.0, "rss_bytes": 50e6},
    )


def test_sample_configuration_loads() -> None:
    """The commented sample.toml validates."""
    assert [c.name for c in load_sample("system")] == ["gateway-health"]


def test_config_errors_name_the_key() -> None:
    """An unknown group or a bad interval is refused naming the key."""
    with pytest.raises(ValueError, match="groups"):
        config(groups=["cpu", "gpu"])
    with pytest.raises(ValueError, match="interval"):
        config(interval="-1s")


async def test_probe_reads_this_machine(tmp_path: Path) -> None:
    """Every group is read from this machine; the device is the gateway; agent figures pass."""
    context = agent_context(tmp_path)
    [result] = await SystemInput(config(), context).probe()
    assert result.error is None
    assert result.device_id == context.gateway_id
    readings = result.readings
    assert 0.0 <= float(readings["cpu_percent"]) <= 100.0
    assert float(readings["memory_total_bytes"]) > float(readings["memory_available_bytes"]) > 0
    st = os.statvfs(tmp_path)
    assert float(readings["disk_total_bytes"]) == st.f_blocks * st.f_frsize
    assert abs(float(readings["disk_free_bytes"]) - st.f_bavail * st.f_frsize) < 512 * 2**20
    assert float(readings["load_1m"]) >= 0
    assert float(readings["uptime_seconds"]) > 0
    assert readings["agent_buffer_readings"] == 12.0
    assert readings["agent_dropped"] == 3.0
    assert readings["agent_rss_bytes"] == 50e6
    # This machine has no thermal zones; where it has, "temperature" is reported.
    has_zones = bool(glob.glob("/sys/class/thermal/thermal_zone*/temp"))
    assert ("temperature" in readings) == has_zones


async def test_runs_on_its_interval(tmp_path: Path, emitter: RecordingEmitter) -> None:
    """Readings repeat every interval, the gateway is `online`, each cycle has a duration."""
    context = InputContext(gateway_id=uuid.uuid4(), buffer_path=tmp_path / "buffer.db")
    task = await run_for(SystemInput(config(groups=["cpu", "memory", "agent"]), context), emitter)
    try:
        await emitter.wait_for(lambda: len(emitter.values(context.gateway_id, "cpu_percent")) >= 3)
    finally:
        await stop(task)
    assert emitter.last_status(context.gateway_id) == ("online", "")
    # Without runtime figures the input still reports its own RSS.
    assert all(float(v) > 0 for v in emitter.values(context.gateway_id, "agent_rss_bytes"))
    assert "load_1m" not in {r.metric for r in emitter.readings}
    assert len(emitter.durations) >= 3


async def test_missing_proc_is_an_error_with_a_reason(
    tmp_path: Path, emitter: RecordingEmitter
) -> None:
    """A root without /proc reports `error` naming the groups that failed."""
    context = agent_context(tmp_path)
    [result] = await SystemInput(
        config(root=str(tmp_path), groups=["memory", "load"]), context
    ).probe()
    assert result.error is not None
    assert result.error.startswith("memory: FileNotFoundError")
    assert "load: FileNotFoundError" in result.error


def test_temperature_is_the_hottest_zone(tmp_path: Path) -> None:
    """Thermal zones in millidegrees; the hottest is reported, unreadable zones are skipped."""
    for zone, text in (("0", "41000\n"), ("1", "67500\n"), ("2", "disabled\n")):
        path = tmp_path / f"sys/class/thermal/thermal_zone{zone}/temp"
        path.parent.mkdir(parents=True)
        path.write_text(text)
    assert read_temperature(str(tmp_path)) == {"temperature": 67.5}
    assert read_temperature(str(tmp_path / "none")) == {}


async def test_values_keep_their_kind_and_start_up_is_not_a_cpu_figure(
    tmp_path: Path, emitter: RecordingEmitter
) -> None:
    """Counts arrive as integers, the link state as a boolean; the first cycle has no CPU figure.

    The first `cpu_percent` would cover the agent's own start-up; it is only the baseline.
    """
    context = InputContext(
        gateway_id=uuid.uuid4(),
        buffer_path=tmp_path / "buffer.db",
        stats=lambda: {"link_up": 1.0, "buffer_readings": 12.0, "dropped": 0.0},
    )
    task = await run_for(SystemInput(config(interval="200ms"), context), emitter)
    try:
        await emitter.wait_for(lambda: len(emitter.values(context.gateway_id, "cpu_percent")) >= 2)
    finally:
        await stop(task)
    cycles: dict[int | None, dict[str, object]] = {}
    for reading in emitter.readings:
        cycles.setdefault(reading.time_us, {})[reading.metric] = reading.value
    first, *later = cycles.values()
    assert "cpu_percent" not in first
    assert all("cpu_percent" in cycle for cycle in later)
    kinds = {metric: type(value) for metric, value in first.items()}
    for metric in ("memory_total_bytes", "memory_available_bytes", "disk_total_bytes"):
        assert int is kinds[metric], metric
    for metric in ("agent_buffer_readings", "agent_dropped", "agent_rss_bytes"):
        assert int is kinds[metric], metric
    assert True is first["agent_link_up"]
    for metric in ("memory_used_percent", "disk_free_percent", "load_1m", "uptime_seconds"):
        assert float is kinds[metric], metric


def test_inputs_test_lists_every_metric_and_the_schema_file_describes_them(tmp_path: Path) -> None:
    """``sensormine-agent inputs test`` of a system input lists every metric the running agent
    reports, the agent_* figures included (read from the buffer file), and every one of them is in
    config/schemas/gateway-health.json with its type and unit (the readings validate against it)."""
    root = Path(__file__).resolve().parents[2]
    schema = json.loads((root / "config" / "schemas" / "gateway-health.json").read_text())
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[gateway]\nid = "{uuid.uuid4()}"\ntenant_id = "{uuid.uuid4()}"\n'
        f'[buffer]\npath = "{tmp_path / "buffer.db"}"\n'
        '[[inputs]]\ntype = "system"\nname = "health"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "agent", "inputs", "test", "health", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=root,
    )
    assert 0 == result.returncode, result.stderr
    readings = {
        name.strip(): json.loads(value)
        for name, _, value in (
            line.partition(" = ") for line in result.stdout.splitlines()[1:] if " = " in line
        )
    }
    agent_figures = {
        "agent_buffer_readings",
        "agent_buffer_held_readings",
        "agent_buffer_batches",
        "agent_buffer_bytes",
        "agent_dropped",
        "agent_produced",
        "agent_rss_bytes",
        "agent_link_up",
    }
    assert agent_figures <= set(readings)
    properties = schema["properties"]
    # Every metric the input can report is described (temperature only where a zone exists).
    assert set(readings) <= set(properties)
    assert set(properties) - set(readings) <= {"temperature"}
    assert all("unit" in p for name, p in properties.items() if name != "agent_link_up")
    jsonschema.Draft202012Validator(schema).validate(readings)

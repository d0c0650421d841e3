"""The system input reading this machine."""

from __future__ import annotations

import glob
import os
import uuid
from pathlib import Path

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

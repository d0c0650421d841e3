"""The sysfs input against a real directory tree written in the kernel's formats."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.inputs.base import InputContext, kind
from agent.inputs.sysfs import SysfsConfig, SysfsInput
from tests.inputs.conftest import RecordingEmitter, build_config, load_sample, run_for, stop

W1_GOOD = "4b 01 4b 46 7f ff 05 10 e1 : crc=e1 YES\n4b 01 4b 46 7f ff 05 10 e1 t=20687\n"
W1_BAD_CRC = "4b 01 4b 46 7f ff 05 10 e1 : crc=e1 NO\n4b 01 4b 46 7f ff 05 10 e1 t=20687\n"
W1_POWER_ON = "50 05 4b 46 7f ff 0c 10 1c : crc=1c YES\n50 05 4b 46 7f ff 0c 10 1c t=85000\n"
W1_NEGATIVE = "5e ff 4b 46 7f ff 02 10 56 : crc=56 YES\n5e ff 4b 46 7f ff 02 10 56 t=-10125\n"


def write(root: Path, path: str, text: str) -> Path:
    """Write ``text`` at ``path`` under ``root`` like the kernel exposes it."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A sysfs tree with two 1-wire probes, a thermal zone, an hwmon chip and an IIO file."""
    root = tmp_path / "root"
    write(root, "/sys/bus/w1/devices/28-0316a2795aff/w1_slave", W1_GOOD)
    write(root, "/sys/bus/w1/devices/28-000005e2fdc3/w1_slave", W1_NEGATIVE)
    write(root, "/sys/class/thermal/thermal_zone0/temp", "48312\n")
    write(root, "/sys/class/hwmon/hwmon0/name", "cpu_thermal\n")
    write(root, "/sys/class/hwmon/hwmon1/name", "ina219\n")
    write(root, "/sys/class/hwmon/hwmon1/in1_input", "12034\n")
    write(root, "/sys/class/hwmon/hwmon1/curr1_input", "250\n")
    write(root, "/sys/class/hwmon/hwmon1/power1_input", "3008500\n")
    write(root, "/sys/bus/iio/devices/iio:device0/in_voltage0_raw", "2048\n")
    return root


IDS = {name: uuid.uuid4() for name in ("w1a", "w1b", "zone", "ina", "adc")}


def config_for(root: Path, interval: str = "100ms", **extra: object) -> SysfsConfig:
    """A sysfs configuration reading every device of the ``tree`` fixture."""
    raw = {
        "type": "sysfs",
        "name": "test-sysfs",
        "interval": interval,
        "root": str(root),
        "devices": [
            {"kind": "w1", "id": str(IDS["w1a"]), "name": "w1a", "sensor": "28-0316a2795aff"},
            {"kind": "w1", "id": str(IDS["w1b"]), "name": "w1b", "sensor": "28-000005e2fdc3"},
            {"kind": "thermal", "id": str(IDS["zone"]), "name": "soc", "zone": 0},
            {
                "kind": "hwmon",
                "id": str(IDS["ina"]),
                "name": "supply",
                "chip": "ina219",
                "inputs": {
                    "voltage": "in1_input",
                    "current": "curr1_input",
                    "power": "power1_input",
                },
            },
            {
                "kind": "file",
                "id": str(IDS["adc"]),
                "name": "adc",
                "path": "/sys/bus/iio/devices/iio:device0/in_voltage0_raw",
                "metric": "level",
                "scale": 0.5,
                "offset": -4,
            },
        ],
        **extra,
    }
    config = build_config("sysfs", raw)
    assert isinstance(config, SysfsConfig)
    return config


def test_sample_configuration_loads() -> None:
    """The commented sample.toml validates against the sysfs model."""
    configs = load_sample("sysfs")
    assert [c.name for c in configs] == ["boiler-room"]
    assert kind("sysfs").config_model is SysfsConfig


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    """A bad duration or a bad sensor id is refused with the key in the message."""
    with pytest.raises(ValidationError) as info:
        config_for(tmp_path, interval="soon")
    assert "interval" in str(info.value)
    with pytest.raises(ValidationError) as info:
        build_config(
            "sysfs",
            {
                "type": "sysfs",
                "name": "x",
                "devices": [{"kind": "w1", "id": str(uuid.uuid4()), "name": "p", "sensor": "28-x"}],
            },
        )
    assert "devices.0.w1.sensor" in str(info.value)
    with pytest.raises(ValidationError) as info:
        config_for(tmp_path, colour="blue")
    assert "colour" in str(info.value)


async def test_probe_reads_every_format(tree: Path, context: InputContext) -> None:
    """Each kernel format is parsed and scaled to its unit."""
    results = {r.device_name: r for r in await SysfsInput(config_for(tree), context).probe()}
    assert results["w1a"].readings == {"temperature": 20.687}
    assert results["w1b"].readings == {"temperature": -10.125}
    assert results["soc"].readings == {"temperature": 48.312}
    assert pytest.approx({"voltage": 12.034, "current": 0.25, "power": 3.0085}) == dict(
        results["supply"].readings
    )
    assert results["adc"].readings == {"level": 1020.0}
    assert all(r.error is None for r in results.values())


async def test_crc_no_is_an_error_not_a_reading(
    tree: Path, context: InputContext, emitter: RecordingEmitter
) -> None:
    """A w1_slave whose CRC line says NO makes the probe `error`; a good read brings it back."""
    w1 = tree / "sys/bus/w1/devices/28-0316a2795aff/w1_slave"
    w1.write_text(W1_BAD_CRC)
    task = await run_for(SysfsInput(config_for(tree), context), emitter)
    try:
        await emitter.wait_for(lambda: emitter.last_status(IDS["w1a"]) is not None)
        status, reason = emitter.last_status(IDS["w1a"]) or ("", "")
        assert status == "error"
        assert "crc check failed (crc=e1 NO)" in reason
        assert emitter.values(IDS["w1a"], "temperature") == []
        # The other devices are unaffected.
        assert emitter.last_status(IDS["w1b"]) == ("online", "")
        w1.write_text(W1_GOOD)
        await emitter.wait_for(lambda: emitter.last_status(IDS["w1a"]) == ("online", ""))
        await emitter.wait_for(lambda: 20.687 in emitter.values(IDS["w1a"], "temperature"))
    finally:
        await stop(task)
    kinds_of_events = [e["kind"] for e in emitter.events if e["device_id"] == IDS["w1a"]]
    assert kinds_of_events == ["device.error", "device.recovered"]


async def test_power_on_value_and_missing_files(tree: Path, context: InputContext) -> None:
    """85 °C (power-on value), a vanished probe and a non-number are errors naming the cause."""
    write(tree, "/sys/bus/w1/devices/28-0316a2795aff/w1_slave", W1_POWER_ON)
    (tree / "sys/bus/w1/devices/28-000005e2fdc3/w1_slave").unlink()
    write(tree, "/sys/class/thermal/thermal_zone0/temp", "garbage\n")
    (tree / "sys/class/hwmon/hwmon1/name").write_text("other\n")
    results = {r.device_name: r for r in await SysfsInput(config_for(tree), context).probe()}
    assert "power-on value" in (results["w1a"].error or "")
    assert "does not exist" in (results["w1b"].error or "")
    assert "not a number" in (results["soc"].error or "")
    assert "no hwmon chip named 'ina219'" in (results["supply"].error or "")
    assert results["adc"].readings == {"level": 1020.0}


async def test_cadence_and_read_duration(
    tree: Path, context: InputContext, emitter: RecordingEmitter
) -> None:
    """Readings arrive every interval with a timestamp; each cycle reports its duration."""
    task = await run_for(SysfsInput(config_for(tree, interval="100ms"), context), emitter)
    try:
        await emitter.wait_for(lambda: len(emitter.values(IDS["zone"], "temperature")) >= 5)
    finally:
        await stop(task)
    times = [r.at for r in emitter.readings if r.device_id == IDS["zone"]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # On the interval's cadence: a cycle that ran late is followed by one on schedule, so a
    # single gap may be short on a loaded machine; on average they are the interval, none is
    # a busy loop and none a missed round.
    assert all(0 < gap < 1.0 for gap in gaps), gaps
    assert 0.05 < (times[-1] - times[0]) / len(gaps) < 0.5, gaps
    assert all(r.time_us is not None for r in emitter.readings)
    assert len(emitter.durations) >= 5
    assert all(0 <= d < 1 for d in emitter.durations)


async def test_hanging_file_times_out_without_stopping_others(
    tree: Path, context: InputContext, emitter: RecordingEmitter
) -> None:
    """A file whose read blocks (a FIFO with no writer) is reported; other devices keep going."""
    import os

    fifo = tree / "sys/bus/iio/devices/iio:device0/in_voltage0_raw"
    fifo.unlink()
    os.mkfifo(fifo)
    config = config_for(tree, interval="100ms", timeout="200ms")
    task = await run_for(SysfsInput(config, context), emitter)
    try:
        await emitter.wait_for(lambda: emitter.last_status(IDS["adc"]) is not None)
        status, reason = emitter.last_status(IDS["adc"]) or ("", "")
        assert status == "error"
        assert "timeout" in reason
        before = len(emitter.values(IDS["zone"], "temperature"))
        await emitter.wait_for(
            lambda: len(emitter.values(IDS["zone"], "temperature")) >= before + 4
        )
    finally:
        await stop(task)
        # Unblock the thread stuck in open() so the test leaves nothing behind.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"1\n")
        os.close(fd)
    await asyncio.sleep(0)

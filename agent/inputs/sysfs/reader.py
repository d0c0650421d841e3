"""Blocking readers for the kernel's sysfs formats; they run on the input's own threads."""

from __future__ import annotations

from pathlib import Path

from agent.inputs.sysfs.config import FileDevice, HwmonDevice, SysfsDevice, ThermalDevice, W1Device

# Units of hwmon's *_input files (Documentation/hwmon/sysfs-interface.rst), to SI-ish units:
# °C, V, A, W, J, RPM, %RH.
HWMON_SCALE = {
    "temp": 0.001,
    "in": 0.001,
    "curr": 0.001,
    "power": 0.000001,
    "energy": 0.000001,
    "humidity": 0.001,
    "fan": 1.0,
    "pwm": 1.0,
    "freq": 1.0,
}
W1_POWER_ON_MILLIDEGREES = 85000


class SysfsReadError(Exception):
    """A file that is missing, unreadable or not in the expected format; the message says which."""


def under_root(root: str, path: str) -> Path:
    """``path`` (absolute, as on a gateway) placed under the configured root."""
    return Path(root) / path.lstrip("/")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise SysfsReadError(f"{path} does not exist") from None
    except OSError as exc:
        # EIO is what a 1-wire master returns for a probe that vanished mid-read.
        raise SysfsReadError(f"{path}: {exc.strerror or exc}") from None


def _number(path: Path, text: str) -> float:
    stripped = text.strip()
    try:
        return float(stripped)
    except ValueError:
        raise SysfsReadError(f"{path} holds {stripped[:40]!r}, not a number") from None


def parse_w1_slave(path: Path, text: str, reject_power_on_value: bool) -> float:
    """Degrees Celsius from a ``w1_slave`` file, refusing a failed CRC or a missing ``t=``."""
    lines = text.strip().splitlines()
    if len(lines) < 2 or "crc=" not in lines[0]:
        raise SysfsReadError(f"{path} is not in w1_slave format: {text[:80]!r}")
    verdict = lines[0].rsplit(None, 1)[-1]
    if verdict != "YES":
        crc = lines[0].split("crc=", 1)[1].strip()
        raise SysfsReadError(f"crc check failed ({'crc=' + crc}) reading {path}")
    _, found, raw = lines[1].partition("t=")
    if not found:
        raise SysfsReadError(f"{path} has no t= value: {lines[1][:80]!r}")
    try:
        millidegrees = int(raw.strip())
    except ValueError:
        raise SysfsReadError(f"{path} has t={raw.strip()[:20]!r}, not a number") from None
    if reject_power_on_value and millidegrees == W1_POWER_ON_MILLIDEGREES:
        raise SysfsReadError(
            f"{path} reads 85.000 °C, the power-on value: the conversion did not run"
        )
    return millidegrees / 1000.0


def find_hwmon(root: str, chip: str) -> Path:
    """The ``hwmonN`` directory whose ``name`` is ``chip`` (the N is not stable across boots)."""
    base = under_root(root, "/sys/class/hwmon")
    try:
        candidates = sorted(base.iterdir())
    except OSError:
        raise SysfsReadError(f"{base} cannot be listed") from None
    for candidate in candidates:
        name_file = candidate / "name"
        try:
            if name_file.read_text(encoding="ascii", errors="replace").strip() == chip:
                return candidate
        except OSError:
            continue
    raise SysfsReadError(f"no hwmon chip named {chip!r} under {base}")


def hwmon_scale(file_name: str) -> float:
    """The factor turning an hwmon ``*_input`` file's integer into its unit."""
    prefix = file_name.split("_", 1)[0].rstrip("0123456789")
    return HWMON_SCALE.get(prefix, 1.0)


def read_device(root: str, device: SysfsDevice) -> dict[str, float]:
    """Read one configured device; its readings by metric, or ``SysfsReadError``."""
    if isinstance(device, W1Device):
        path = under_root(root, f"/sys/bus/w1/devices/{device.sensor}/w1_slave")
        return {device.metric: parse_w1_slave(path, _read_text(path), device.reject_power_on_value)}
    if isinstance(device, ThermalDevice):
        path = under_root(root, f"/sys/class/thermal/thermal_zone{device.zone}/temp")
        return {device.metric: _number(path, _read_text(path)) / 1000.0}
    if isinstance(device, HwmonDevice):
        chip_dir = find_hwmon(root, device.chip)
        readings: dict[str, float] = {}
        for metric, file_name in device.inputs.items():
            path = chip_dir / file_name
            if not path.exists() and (chip_dir / "device" / file_name).exists():
                # Drivers from before Linux 3.x put the attributes one level down.
                path = chip_dir / "device" / file_name
            readings[metric] = _number(path, _read_text(path)) * hwmon_scale(file_name)
        return readings
    if isinstance(device, FileDevice):
        path = under_root(root, device.path)
        return {device.metric: _number(path, _read_text(path)) * device.scale + device.offset}
    raise AssertionError(f"unhandled sysfs device kind {device!r}")

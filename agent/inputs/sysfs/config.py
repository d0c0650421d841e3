"""Configuration of the ``sysfs`` input: 1-wire probes, thermal zones, hwmon chips, number files."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from agent.inputs.base import InputConfig, NamedPath
from agent.inputs.common import DeviceConfig, Duration, MetricName

Scale = Annotated[float, Field(allow_inf_nan=False, ge=-1e12, le=1e12)]


class W1Device(DeviceConfig):
    """A DS18B20 (family 28) probe read from ``/sys/bus/w1/devices/<sensor>/w1_slave``."""

    kind: Literal["w1"]
    sensor: str = Field(pattern=r"^[0-9a-f]{2}-[0-9a-f]{12}$", description="e.g. 28-0316a2795aff")
    metric: MetricName = "temperature"
    # 85 °C is the DS18B20's power-on register value: read back when a conversion did not run
    # (brown-out on parasite power), so by default it is treated as a failed read.
    reject_power_on_value: bool = True


class ThermalDevice(DeviceConfig):
    """A kernel thermal zone, ``/sys/class/thermal/thermal_zone<zone>/temp`` (millidegrees)."""

    kind: Literal["thermal"]
    zone: int = Field(ge=0, le=1023)
    metric: MetricName = "temperature"


class HwmonDevice(DeviceConfig):
    """An hwmon chip found by its ``name`` file; each metric maps to an ``*_input`` file."""

    kind: Literal["hwmon"]
    chip: str = Field(min_length=1, max_length=64, description="content of hwmon*/name")
    inputs: dict[MetricName, Annotated[str, Field(pattern=r"^[a-z]+[0-9]*_input$")]] = Field(
        min_length=1, max_length=64
    )


class FileDevice(DeviceConfig):
    """Any file holding one number; reading = number × scale + offset."""

    kind: Literal["file"]
    path: str = Field(min_length=1, max_length=4096)
    metric: MetricName
    scale: Scale = 1.0
    offset: Scale = 0.0


SysfsDevice = Annotated[
    W1Device | ThermalDevice | HwmonDevice | FileDevice, Field(discriminator="kind")
]


class SysfsConfig(InputConfig):
    """Kernel sensor files: 1-wire DS18B20 probes, thermal zones, hwmon, number files."""

    type: Literal["sysfs"]
    interval: Duration = Field(default=10.0, ge=0.05, le=86400.0)
    # A read that takes longer (a 1-wire bus with a shorted probe) marks the device as failing;
    # the stuck read is left to finish on the input's own thread.
    timeout: Duration = Field(default=5.0, ge=0.01, le=600.0)
    # Prefix for every path; "/" on a gateway, a directory tree in tests.
    root: str = Field(default="/", min_length=1, max_length=4096)
    devices: list[SysfsDevice] = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _unique_devices(self) -> SysfsConfig:
        ids = [device.id for device in self.devices]
        if len(ids) != len(set(ids)):
            raise ValueError("devices: two devices have the same id")
        return self

    def named_paths(self) -> list[NamedPath]:
        """The root, and each device's file (a probe may be wired, a module loaded, later)."""
        paths = [NamedPath("root", self.root, "directory")]
        for i, device in enumerate(self.devices):
            if isinstance(device, W1Device):
                file = f"/sys/bus/w1/devices/{device.sensor}/w1_slave"
            elif isinstance(device, ThermalDevice):
                file = f"/sys/class/thermal/thermal_zone{device.zone}/temp"
            elif isinstance(device, FileDevice):
                file = device.path
            else:
                continue  # hwmon chips are found by name at run time
            located = f"{self.root.rstrip('/')}/{file.lstrip('/')}"
            paths.append(NamedPath(f"devices[{i}]", located, "read", present=False))
        return paths

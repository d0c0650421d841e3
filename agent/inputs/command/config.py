"""Configuration of the ``command`` input: a program run on an interval or kept running."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from agent.inputs.base import InputConfig, NamedPath
from agent.inputs.common import DeviceConfig, Duration, TimeZoneName


class CommandConfig(InputConfig):
    """Readings from a program's output lines, run on an interval or kept running."""

    type: Literal["command"]
    # argv, run without a shell so that nothing in it is interpreted; use ["sh", "-c", "..."]
    # deliberately when a pipeline is wanted.
    command: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        min_length=1, max_length=256
    )
    # "interval": run, read its output, wait for it to exit; "stream": keep it running and
    # read each line as it comes.
    mode: Literal["interval", "stream"] = "interval"
    interval: Duration = Field(default=60.0, ge=0.05, le=86400.0)
    # interval mode: kill a run that takes longer. stream mode: kill a program that prints
    # nothing for this long (0 = never), then restart it.
    timeout: Duration = Field(default=10.0, ge=0.0, le=86400.0)
    restart_delay: Duration = Field(default=5.0, ge=0.0, le=3600.0)
    # "auto" takes a line starting with "{" as JSON and anything else as metric=value pairs.
    format: Literal["auto", "json", "keyvalue"] = "auto"
    # With several devices, each line names its device (by its name) in this key.
    device_field: str = Field(default="device", min_length=1, max_length=64)
    # Key holding the reading's time (epoch s/ms/µs or ISO 8601); absent means "now".
    time_field: str | None = Field(default=None, min_length=1, max_length=64)
    # The zone of ISO times without an offset in time_field; without it they are refused.
    timezone: TimeZoneName | None = None
    max_line_bytes: int = Field(default=65536, ge=256, le=16 * 1024 * 1024)
    working_dir: str | None = Field(default=None, min_length=1, max_length=4096)
    env: dict[
        Annotated[str, Field(min_length=1, max_length=256)],
        Annotated[str, Field(max_length=65536)],
    ] = Field(default_factory=dict, max_length=256)
    devices: list[DeviceConfig] = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _check(self) -> CommandConfig:
        if self.mode == "interval" and self.timeout <= 0:
            raise ValueError("timeout: interval mode needs a timeout above 0")
        names = [device.name for device in self.devices]
        if len(names) != len(set(names)):
            raise ValueError("devices: two devices have the same name")
        ids = [device.id for device in self.devices]
        if len(ids) != len(set(ids)):
            raise ValueError("devices: two devices have the same id")
        return self

    def named_paths(self) -> list[NamedPath]:
        """The program (looked up in the input's ``PATH`` when it has no slash) and working_dir."""
        paths = [
            NamedPath("command[0]", self.command[0], "program", search_path=self.env.get("PATH"))
        ]
        if self.working_dir is not None:
            paths.append(NamedPath("working_dir", self.working_dir, "directory"))
        return paths

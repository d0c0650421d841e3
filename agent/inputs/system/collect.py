"""Reading the host's health from /proc, /sys and statvfs (blocking; run off the event loop)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from agent.inputs.sysfs.reader import under_root


@dataclass
class CpuTimes:
    """Cumulative busy and total jiffies from the first line of /proc/stat."""

    busy: int
    total: int


@dataclass
class Collected:
    """Readings by metric, and the groups that could not be read with why."""

    readings: dict[str, int | float | bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def read_cpu_times(root: str) -> CpuTimes:
    """Busy and total CPU time so far (all CPUs)."""
    line = under_root(root, "/proc/stat").read_text().splitlines()[0]
    values = [int(v) for v in line.split()[1:]]
    # user nice system idle iowait irq softirq steal; guest time is already inside user.
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return CpuTimes(busy=total - idle, total=total)


def cpu_percent(before: CpuTimes, after: CpuTimes) -> float | None:
    """Share of CPU time spent busy between two samples, or ``None`` if no time passed."""
    elapsed = after.total - before.total
    if elapsed <= 0:
        return None
    return round(100.0 * (after.busy - before.busy) / elapsed, 2)


def read_memory(root: str) -> dict[str, int | float]:
    """Total and available memory and the used share, from /proc/meminfo."""
    fields: dict[str, int] = {}
    for line in under_root(root, "/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            fields[key] = int(parts[0]) * 1024  # the kernel writes kB
    total = fields["MemTotal"]
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    return {
        "memory_total_bytes": total,
        "memory_available_bytes": available,
        "memory_used_percent": round(100.0 * (total - available) / total, 2) if total else 0.0,
    }


def existing_dir(path: Path) -> Path:
    """``path``'s directory, or its nearest existing ancestor (the buffer may not exist yet)."""
    current = path.parent if not path.is_dir() else path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def read_disk(buffer_path: Path) -> dict[str, int | float]:
    """Free and total space of the file system holding the buffer."""
    st = os.statvfs(existing_dir(buffer_path))
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize  # what an unprivileged writer like the agent can use
    return {
        "disk_total_bytes": total,
        "disk_free_bytes": free,
        "disk_free_percent": round(100.0 * free / total, 2) if total else 0.0,
    }


def read_load(root: str) -> dict[str, int | float]:
    """Load averages over 1, 5 and 15 minutes."""
    parts = under_root(root, "/proc/loadavg").read_text().split()
    return {"load_1m": float(parts[0]), "load_5m": float(parts[1]), "load_15m": float(parts[2])}


def read_uptime(root: str) -> dict[str, int | float]:
    """Seconds since boot."""
    return {"uptime_seconds": float(under_root(root, "/proc/uptime").read_text().split()[0])}


def read_temperature(root: str) -> dict[str, int | float]:
    """The hottest thermal zone in °C; nothing where the machine has no thermal zones."""
    base = under_root(root, "/sys/class/thermal")
    temperatures = []
    for zone in sorted(base.glob("thermal_zone*")):
        try:
            temperatures.append(int((zone / "temp").read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue  # some zones (disabled sensors) refuse reads; the others still count
    return {"temperature": max(temperatures)} if temperatures else {}
